"""The retrieval read (`read_mode="retrieve"`): which stored injections each row of a batch reads, and its prefix.

`read_mode="retrieve"` replaces the pool read `[bos; pool]` by `[bos; the slots of the injections that score best
against the prompt, in the order they were written]`. The scores come from `memory_retrieval`; this file turns them
into a choice per row (`select_injections`) and stacks rows whose prefixes differ in length into one left-padded
cache (`stack_prefixes`): a row's padding columns are masked out, so a batch reads exactly what its rows read alone.
`RetrieveRead` is the read mode (the model's public retrieval API is `memory_reads.MemoryReadMixin`).
"""

import functools
import os

import torch

from .memory_adapters import READ
from .memory_cache import DerivedCache
from .memory_check import LikelihoodCheck
from .memory_fields import MemoryStateError
from .memory_files import (
    LONG_TERM_FILE,
    MEMORY_STATE_FILE,
    SEGMENTS_DIR,
    check_segments_beside,
    checkpoint_file,
    load_store,
    local_entry_replaced,
    read_hub_segments,
    read_json_object,
    read_segments,
    read_store_beside,
)
from .memory_prefix import PrefixKV, key_value_weights_fingerprint, rotate_prefix_keys, seeded_cache, slot_key_values
from .memory_scoring import Prompts, Scoring
from .memory_settings import store_device, store_dtype
from .memory_store import (
    LongTermStoreError,
    check_token_vocab,
    default_long_term_tokens,
    store_num_slots,
    validate_store,
)
from .memory_subject import SubjectGate
from .mplus_memory import MPlusMemory


def select_injections(
    scores: torch.Tensor,
    sizes: list[int],
    calls: list[int],
    budget: int,
    threshold: float | None = None,
    neighbors: int = 0,
    margin: float | None = None,
    skip: frozenset[int] | set[int] = frozenset(),
) -> list[int]:
    """Indices (ascending, i.e. in the order written) of the blocks one row reads.

    Blocks are taken best score first while their slots fit the `budget`; a block scoring below `threshold`, or more
    than `margin` below the best block, is not taken for its own score. With `neighbors` > 0, after each taken block
    the `neighbors` blocks before and after it that belong to the same text (`calls`: the first update of the text)
    are taken too, nearest first, while they fit (a long text is several blocks). Ties are broken by recency (the
    newer block first), so the choice is deterministic. A block in `skip` (one the likelihood check refused) is never
    taken for its own score, and the margin counts from the best block not in it.
    """
    count = len(sizes)
    if scores.shape != (count,):
        raise ValueError(f"need one score per block: {tuple(scores.shape)} scores for {count} blocks")
    order = sorted((i for i in range(count) if i not in skip), key=lambda i: (-float(scores[i]), -i))
    chosen: set[int] = set()
    used = 0

    def take(index: int) -> None:
        nonlocal used
        if index not in chosen and used + sizes[index] <= budget:
            chosen.add(index)
            used += sizes[index]

    floor = threshold
    if margin is not None and order:
        best = float(scores[order[0]]) - margin
        floor = best if floor is None else max(floor, best)
    for index in order:
        if floor is not None and float(scores[index]) < floor:
            break
        if index in chosen:
            continue
        take(index)
        if index not in chosen:
            continue
        for step in range(1, min(neighbors, count) + 1):  # (more steps than blocks find nothing)
            for other in (index - step, index + step):
                if 0 <= other < count and calls[other] == calls[index]:
                    take(other)
        if used >= budget:
            break
    return sorted(chosen)


def stack_prefixes(rows: list[PrefixKV]) -> tuple[PrefixKV, torch.Tensor]:
    """Per-layer keys/values [B, kv_heads, P, head_dim] of rows whose prefixes ([1, kv_heads, P_b, head_dim] each)
    differ in length, left-padded with zeros to the longest, and the mask [B, P] of the real prefix columns."""
    lengths = [row[0][0].shape[2] for row in rows]
    longest = max(lengths)
    reference = rows[0][0][0]
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=reference.device)
    for index, length in enumerate(lengths):
        mask[index, longest - length :] = 1
    stacked = []
    for layer in range(len(rows[0])):
        keys, values = [], []
        for row, length in zip(rows, lengths, strict=True):
            k, v = row[layer]
            if length < longest:
                pad = (0, 0, longest - length, 0)
                k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
            keys.append(k)
            values.append(v)
        stacked.append((torch.cat(keys).contiguous(), torch.cat(values).contiguous()))
    return stacked, mask


class RetrieveRead:
    """Prefix `[bos; the slots of the injections that score best against the row's prompt, in the order written]`,
    per row. The scores come from `scoring` (the configured scorer's parts and their per-block indexes,
    `memory_scoring`); the un-rotated keys/values of recently read blocks are cached under the one rule of
    `memory_cache` (`key_values`, kept per block, stale when the weights change, bounded by
    `model.retrieval_kv_cache_slots`)."""

    def __init__(self):
        # the configured scorer's parts (memory_scoring): their indexes follow the store block by block
        self.scoring = Scoring()
        self.check = LikelihoodCheck()  # memory_check: with config.retrieval_likelihood_gain / _weight set
        self.gate = SubjectGate()  # memory_subject: with config.retrieval_subject_gate
        self.key_values = DerivedCache(size=prefix_slots)
        self.last: list[list[int]] | None = None  # injection numbers each row of the last read chose

    @staticmethod
    def check_config(config) -> None:
        if config.long_term_memory_tokens == 0:
            raise ValueError(
                "read_mode='retrieve' reads from the long-term store: set long_term_memory_tokens > 0 "
                "(or use read_mode='pool')"
            )

    @staticmethod
    def from_base_defaults(memory_config: dict, base_config) -> None:
        """`from_base` settings (unless given): read 4 updates and their neighbours from a bfloat16 store of ~1 GiB."""
        update = memory_config.get("num_update_tokens", 16)
        memory_config.setdefault("read_tokens", 4 * update)
        memory_config.setdefault("retrieval_neighbors", 1)  # and the neighbouring updates of their text
        memory_config.setdefault("long_term_memory_dtype", "bfloat16")
        memory_config.setdefault(
            "long_term_memory_tokens",
            default_long_term_tokens(
                base_config.num_hidden_layers, base_config.hidden_size, memory_config["long_term_memory_dtype"], update
            ),
        )

    def has_memory(self, model) -> bool:
        return bool(model.long_term_memory)

    def longest_prefix(self, model, slots=None) -> int:
        """Positions the prefix of the next read may take at most: `[bos; read_tokens slots]`, or fewer when the
        store holds fewer (known before any scoring)."""
        cfg = model.config
        return int(cfg.add_bos_embedding) + min(cfg.read_tokens, store_num_slots(model.long_term_memory))

    @torch.no_grad()
    def scores(self, model, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """Scores [B, stored injections] of every block of the store against each prompt row (the scorer of
        `config.retrieval_scorer`, `memory_scoring.RETRIEVAL_SCORERS`)."""
        return self.scoring.scores(model, input_ids, attention_mask, inputs_embeds)

    def blocks(self, model, input_ids=None, attention_mask=None, inputs_embeds=None) -> list[list]:
        """The blocks each row reads; also kept as `last` (injection numbers per row)."""
        with model.memory_lock:
            store = model.long_term_memory
            scores = self.scores(model, input_ids, attention_mask, inputs_embeds)
        cfg = model.config
        sizes, calls = [block.num_slots for block in store], [block.call for block in store]
        select = functools.partial(select_injections, sizes=sizes, calls=calls, budget=cfg.read_tokens,
                                   threshold=cfg.retrieval_threshold)
        rows = scores.float().cpu()
        words = None
        if self.check.configured(cfg) or self.gate.configured(cfg):
            if input_ids is None:
                raise ValueError("the likelihood check (retrieval_likelihood_gain / retrieval_likelihood_weight) and "
                                 "the subject gate (retrieval_subject_gate) read the prompt's words: pass input_ids "
                                 "(not only inputs_embeds), or turn them off")
            words = Prompts(input_ids, attention_mask, None).rows
        # per row, the selection without the blocks the subject gate refuses (never read for their own score)
        selects = [select] * len(rows)
        if self.gate.configured(cfg):
            selects = [functools.partial(select, skip=frozenset(self.gate.refused(model, store, row, ids)))
                       for row, ids in zip(rows, words, strict=True)]
        if not self.check.configured(cfg):
            chosen = [pick(row, neighbors=cfg.retrieval_neighbors, margin=cfg.retrieval_margin)
                      for row, pick in zip(rows, selects, strict=True)]
        else:
            chosen = [self.check.choose(model, store, row, ids, pick)
                      for row, ids, pick in zip(rows, words, selects, strict=True)]
        self.last = [[store[i].injection for i in row] for row in chosen]
        return [[store[i] for i in row] for row in chosen]

    @torch.no_grad()
    def prefix(self, model, input_ids, inputs_embeds, attention_mask) -> tuple[PrefixKV, torch.Tensor]:
        """Per-layer keys/values [B, kv, P, hd] of each row's `[bos; retrieved slots]`, left-padded, and the mask
        [B, P] of the real prefix columns (rows that chose the same injections share one computation)."""
        by_choice: dict[tuple, PrefixKV] = {}
        rows = []
        layers, limit = model.model.layers, model.retrieval_kv_cache_slots
        memory = model.memory

        def kv(block) -> PrefixKV:
            return slot_key_values(layers, list(block.slots.to(device=memory.device, dtype=memory.dtype)))

        with model.adapters.use(READ):
            bos, _ = model.memory_embeddings()
            weights = (memory.dtype, memory.device) + key_value_weights_fingerprint(layers, bos)
            if bos is None:
                empty = memory.new_zeros(model.config.num_hidden_layers, 0, model.config.hidden_size)
                bos_kv = slot_key_values(layers, list(empty))
            else:
                bos_hidden = list(bos.to(memory.dtype))
                bos_kv = self.key_values.get("bos", weights, lambda: slot_key_values(layers, bos_hidden), limit)
            for blocks in self.blocks(model, input_ids, attention_mask, inputs_embeds):
                key = tuple(block.injection for block in blocks)
                if key not in by_choice:
                    parts = [bos_kv] + [self.key_values.get(b, weights, lambda b=b: kv(b), limit) for b in blocks]
                    joined = [
                        (torch.cat([p[layer][0] for p in parts], 2), torch.cat([p[layer][1] for p in parts], 2))
                        for layer in range(len(parts[0]))
                    ]
                    by_choice[key] = rotate_prefix_keys(joined, model.model.rotary_emb)
                rows.append(by_choice[key])
        return stack_prefixes(rows)

    def read(self, model, batch, rows: int, slots=None, read_only=False, max_cache_len=None):
        """(cache seeded with each row's retrieved prefix for `rows` cache rows (beams repeat each row), attention
        mask [B, prefix + tokens]) of one prompt batch (`ReadBatch`)."""
        mask = batch.attention_mask
        if mask is not None and (mask.dim() != 2 or mask.shape[1] != batch.length):
            raise ValueError(
                f"with read_mode={model.config.read_mode!r} the attention_mask covers the tokens only: expected [batch, "
                f"{batch.length}], got {tuple(mask.shape)}"
            )
        prefix_kv, prefix_mask = self.prefix(model, batch.input_ids, batch.inputs_embeds, mask)
        repeat = rows // batch.size
        if repeat != 1:
            prefix_kv = [(k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in prefix_kv]
        if mask is None:
            mask = torch.ones(batch.size, batch.length, dtype=torch.long, device=batch.device)
        full_mask = torch.cat([prefix_mask.to(mask.device, mask.dtype), mask], dim=1)
        static = None if max_cache_len is None else prefix_mask.shape[1] + max_cache_len
        prefix_mask = prefix_mask.repeat_interleave(repeat, 0)
        return seeded_cache(model.config, prefix_kv, rows, read_only, static, prefix_mask), full_mask

    def clear(self) -> None:
        self.scoring.clear()
        self.check.clear()
        self.gate.clear()
        self.key_values.clear()


def prefix_slots(kv: PrefixKV) -> int:
    """Slots per layer a cached prefix holds (the size the key/value cache is bounded in)."""
    return kv[0][0].shape[2]


def hub_or_folder_segments(path_or_repo, kwargs: dict, folder):
    """A function reading the checkpoint's disk-backed store from its segment files (given the model's fingerprint):
    `long_term/` of a local `folder`, or the segments a Hub revision's `memory_state.json` lists; None: it has none."""
    if folder is not None:
        return (lambda fp: read_segments(folder, fp)) if os.path.isdir(os.path.join(folder, SEGMENTS_DIR)) else None
    state_path = checkpoint_file(path_or_repo, kwargs, MEMORY_STATE_FILE)
    listed = {} if state_path is None else read_json_object(state_path, MEMORY_STATE_FILE)
    if not listed.get("segments"):
        return None
    fetch = lambda name: checkpoint_file(path_or_repo, kwargs, name)  # noqa: E731
    return lambda fp: read_hub_segments(fetch, listed, fp)


def read_long_term_file(path_or_repo, kwargs: dict, config, fingerprint, num_injections: int, pool_file=None,
                        folder=None):
    """The checkpoint's long-term store, checked (against `fingerprint()`, the reading model's, computed only when
    there is a store; and to be the store the pool file `pool_file` records) and cast to the configured dtype and
    device, or None: `long_term_memory.safetensors`, or the segment files of a disk-backed store (`long_term/` of a
    local `folder`, or those a Hub revision's `memory_state.json` lists). With `long_term_memory_storage="disk"` the
    slots stay memory-mapped. `folder`: the checkpoint's local folder, if it is one."""
    path = checkpoint_file(path_or_repo, kwargs, LONG_TERM_FILE)
    segments = None if path is not None else hub_or_folder_segments(path_or_repo, kwargs, folder)
    if path is None and segments is None and config.retriever_size:
        raise ValueError(
            f"{path_or_repo} is an M+ model but has no {LONG_TERM_FILE} (its long-term memory): restore the file, or "
            "convert the official checkpoint again"
        )
    if path is None and segments is None and pool_file is None:
        return None
    on_disk = config.long_term_memory_storage == "disk"
    try:
        if segments is not None:
            store = segments(fingerprint())
            if pool_file is not None:
                check_segments_beside(pool_file, store, str(path_or_repo))
        elif pool_file is None:  # a memory inside the weights (older layouts): no record of a store
            store = load_store(path, fingerprint(), mapped=on_disk)
        else:
            replaced = local_entry_replaced(folder, LONG_TERM_FILE)
            store = read_store_beside(pool_file, path, fingerprint, num_injections, str(path_or_repo), replaced,
                                      mapped=on_disk)
        if isinstance(store, MPlusMemory) != bool(config.retriever_size):
            raise LongTermStoreError(f"{path} holds the long-term memory of another kind of model (M+ or not)")
        if isinstance(store, MPlusMemory):
            cfg = config
            store.validate(cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size, cfg.retriever_size)
            return store
        if not store:
            return None
        validate_store(store, config.num_hidden_layers, config.hidden_size, num_injections)
        check_token_vocab(store, config.vocab_size)
    except (LongTermStoreError, MemoryStateError) as err:
        raise ValueError(f"{path_or_repo}: {err}") from None
    for block in store:  # (dtype None: the file's)
        device, dtype = store_device(config), store_dtype(config, block.slots.dtype)
        if not on_disk or block.slots.dtype != dtype:
            copy = block.source is not None  # (a map of the file becomes RAM of its own)
            block.slots = block.slots.to(device=device, dtype=dtype, copy=copy)
            block.source = None
    return store
