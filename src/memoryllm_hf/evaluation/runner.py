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

from ..greedy import generate, greedy_config  # noqa: F401 (the tasks take them from here)
from ..modeling import MemoryState, atomic_write, seeded_rng_state


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


def decoding_info(config: GenerationConfig) -> dict:
    return {"do_sample": config.do_sample, "num_beams": config.num_beams, "max_new_tokens": config.max_new_tokens}


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


@torch.no_grad()
def continuation_scores(
    model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], use_memory: bool, pad_id: int = 0
) -> list[dict]:
    """Teacher-forced scores of each (prefix ids, target ids): `logprob` (sum of the target tokens'
    log-probabilities), `greedy` (every target token is the argmax: greedy decoding would produce the target) and
    `token_accuracy` (fraction of target tokens that are the argmax).

    Each distinct prefix is run once (right-padded batch, so a retrieval read sees each row's whole prompt); the
    targets then continue from its cache rows.
    """
    device = model.device
    prefixes = list(dict.fromkeys(tuple(prefix) for prefix, _ in pairs))
    row_of = [prefixes.index(tuple(prefix)) for prefix, _ in pairs]
    prefix_ids, prefix_mask = _right_padded(prefixes, pad_id)
    first = model(
        input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device), use_memory=use_memory, use_cache=True
    )
    lengths = prefix_mask.sum(-1)
    next_logits = first.logits[torch.arange(len(prefixes), device=device), (lengths - 1).to(device)]
    cache = first.cache
    cache.reorder_cache(torch.tensor(row_of, device=device))
    target_ids, target_mask = _right_padded([target for _, target in pairs], pad_id)
    mask = torch.cat([prefix_mask[row_of], target_mask], 1)  # the tokens so far: the model adds memory, positions
    second = model(input_ids=target_ids.to(device), attention_mask=mask.to(device), cache=cache, use_memory=use_memory)
    # The distribution of target token j: after the prefix for j = 0, after target token j - 1 otherwise.
    logits = torch.cat([next_logits[row_of][:, None], second.logits[:, :-1]], dim=1)
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
