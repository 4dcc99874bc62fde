"""What every task shares: seeding, greedy generation, continuation log-probabilities, the results file."""

import dataclasses
import hashlib
import json
import platform
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

from ..modeling.memory_state import MemoryState, seeded_rng_state
from ..modeling.memory_storage import atomic_write


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def example_seed(seed: int, key: str) -> int:
    """A seed for one example, derived from the run's `seed` and the example's id (a stable hash: the same in every
    process and Python version, unlike `hash()`), so examples draw independent but reproducible drops."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def with_drop_seed(state: MemoryState, seed: int) -> MemoryState:
    """`state` whose drop generator restarts from `seed` (the pool itself is shared, not copied)."""
    return dataclasses.replace(state, rng_state=seeded_rng_state(seed).to(state.rng_state.device))


def greedy_config(tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Explicit greedy decoding (a checkpoint's generation_config may sample; we never do so silently)."""
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def decoding_info(config: GenerationConfig) -> dict:
    return {"do_sample": config.do_sample, "num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[Sequence[int]], use_memory: bool, config: GenerationConfig
) -> list[str]:
    """Greedy continuations of prompts generated as one left-padded batch, decoded without special tokens."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[row, width - len(prompt) :] = 1
    output = model.generate(
        ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config, use_memory=use_memory
    )
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


class ExtendingPrompts:
    """Greedy answers (batch 1, no memory) to a series of prompts that mostly extend one another (retention's
    same-text prompts across k): the previous prompt's cache, cut back to the tokens both prompts start with, is
    reused and only the rest is run. The cache then holds exactly the keys/values of those tokens, so this is the
    same computation (up to float rounding of a split prefill); a prompt that starts differently (cut from the left
    by the window) is run from scratch. `reused` counts the prompt tokens not run again."""

    def __init__(self, model, tokenizer, config: GenerationConfig):
        self.model, self.tokenizer = model, tokenizer
        self.config = GenerationConfig(**{**config.to_dict(), "return_dict_in_generate": True})
        self.ids: list[int] = []
        self.cache = None
        self.reused = 0

    @torch.no_grad()
    def answer(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        common = 0
        # (the last prompt token is always run: it gives the first logits)
        for old, new in zip(self.ids, ids[:-1], strict=False):
            if old != new:
                break
            common += 1
        cache = self.cache if common else None
        if cache is not None and cache.get_seq_length() > common:
            cache.crop(common - cache.get_seq_length())
        tokens = torch.tensor([ids], device=self.model.device)
        output = self.model.generate(
            tokens,
            attention_mask=torch.ones_like(tokens),
            generation_config=self.config,
            use_memory=False,
            cache=cache,
        )
        self.ids, self.cache, self.reused = ids, output["cache"], self.reused + common
        return self.tokenizer.decode(output["sequences"][0, len(ids) :], skip_special_tokens=True)


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(list(tokens))
        mask[row, : len(tokens)] = 1
    return ids, mask


def _shared_length(rows: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every row, leaving each row at least one token of its own."""
    shortest = min(map(len, rows)) - 1
    for position in range(shortest):
        if len({row[position] for row in rows}) > 1:
            return position
    return max(shortest, 0)


def _extend(model, ids, mask, cache, use_memory: bool, keep):
    """Forward `ids` [B, n] after `cache` (None: a fresh read, `mask` then covers `ids` only; else it covers the
    cached positions too) with logits at the positions `keep` of `ids` only; returns (logits, cache)."""
    positions = None if cache is None else (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :].to(model.device)
    output = model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        position_ids=positions,
        cache=cache,
        use_memory=use_memory,
        use_cache=True,
        logits_to_keep=keep.to(model.device),
    )
    return output.logits, output.cache


@torch.no_grad()
def continuation_scores(
    model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], use_memory: bool, pad_id: int = 0
) -> list[dict]:
    """Teacher-forced scores of each (prefix ids, target ids): `logprob` (sum of the target tokens'
    log-probabilities), `greedy` (every target token is the argmax: greedy decoding would produce the target) and
    `token_accuracy` (fraction of target tokens that are the argmax).

    The tokens every prefix starts with (a chat template's header, an in-context statement) are run once; each
    distinct rest of a prefix once (right-padded batch); the targets then continue from its cache rows. Logits are
    computed only where a score reads them.
    """
    prefixes = list(dict.fromkeys(tuple(prefix) for prefix, _ in pairs))
    row_of = torch.tensor([prefixes.index(tuple(prefix)) for prefix, _ in pairs])
    memory = model.memory_prefix_length if use_memory and model.memory_is_initialized else 0
    shared, cache = _shared_length(prefixes), None
    mask = torch.ones(len(prefixes), memory + shared, dtype=torch.long)
    if shared:
        ids = torch.tensor([prefixes[0][:shared]])
        _, cache = _extend(model, ids, torch.ones_like(ids), None, use_memory, torch.tensor([shared - 1]))
        cache.reorder_cache(torch.zeros(len(prefixes), dtype=torch.long, device=model.device))
    rest_ids, rest_mask = _right_padded([prefix[shared:] for prefix in prefixes], pad_id)
    mask = torch.cat([mask, rest_mask], 1) if cache is not None else rest_mask
    ends = rest_mask.sum(-1) - 1
    kept, column = torch.unique(ends, return_inverse=True)
    logits, cache = _extend(model, rest_ids, mask, cache, use_memory, kept)
    next_logits = logits[torch.arange(len(prefixes), device=logits.device), column.to(logits.device)][row_of]
    target_ids, target_mask = _right_padded([target for _, target in pairs], pad_id)
    logits = next_logits[:, None]
    if target_ids.shape[1] > 1:  # the distribution of target token j > 0: after target token j - 1
        if memory and cache is None:  # (not reached: a memory read always leaves a cache)
            raise RuntimeError("continuation_scores lost the memory cache")
        cache.reorder_cache(row_of.to(model.device))
        if memory and not shared:
            mask = torch.cat([torch.ones(len(prefixes), memory, dtype=torch.long), mask], 1)
        full = torch.cat([mask[row_of], target_mask], 1)
        keep = torch.arange(target_ids.shape[1] - 1)
        later, _ = _extend(model, target_ids[:, :-1], full[:, :-1], cache, use_memory, keep)
        logits = torch.cat([logits, later], dim=1)
    log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
    scores = []
    for row, (_, target) in enumerate(pairs):
        count = len(target)
        picked = log_probs[row, torch.arange(count), target_ids[row, :count]]
        hits = log_probs[row, :count].argmax(-1) == target_ids[row, :count]
        scores.append(
            {
                "logprob": float(picked.sum()),
                "greedy": bool(hits.all()),
                "token_accuracy": float(hits.float().mean()),
            }
        )
    return scores


def environment() -> dict:
    from .. import __version__

    return {
        "memoryllm_hf": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


class Timer:
    """Wall time since creation."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)


def write_json(path: str | Path, result: dict) -> Path:
    """Write the results file atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1, default=float) + "\n"))
    return path


def result_document(task: str, config: dict, model_info: dict, data_info: dict, seed: int, **fields) -> dict:
    """The common head of every results file; task code adds metrics and per-example records."""
    return {
        "task": task,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "model": model_info,
        "data": data_info,
        "seed": seed,
        "environment": environment(),
        **fields,
    }
