"""M+ long-term memory (Wang et al., ICML 2025): the slots the pool drops, with retrieval keys, ages and recall
frequencies, and its pure update rule.

M+ keeps MemoryLLM's pool (the short-term memory, STM) and adds, per layer, a long-term memory (LTM) of the slots
each injection drops. A dropped slot waits as *pending* (searchable, with the key `key_proj_l(input_layernorm_l(slot))`
computed when it is dropped) until every `long_term_merge_every`-th commit merges the pending slots into the LTM:

* ages: a slot written by an injection gets age K-1, ..., 0 (newest last) and keeps it while it stays in the pool;
  at every commit the age of every LTM and pending slot grows by K (official `ages_to_add = num_tokens`); a slot
  dropped by that commit enters the pending slots with its pool age (not yet grown);
* merge (per layer): LTM := [LTM; pending] with recall frequency `recall_initial` for the newcomers; every recall
  frequency drops by `recall_decay`; the slots at or below `RECALL_FLOOR` leave, unless no more than `read_tokens`
  slots would survive (then nobody leaves and the decay is taken back). Reads never raise a recall frequency (as in
  the official code), so eviction is a count-down: a slot survives about `recall_initial / recall_decay` merges.

Layers evict independently, so every layer holds its own number of LTM slots (`slot_counts`). An `MPlusMemory` is an
immutable value (tensors are never edited in place): memory states, snapshots and undo share it.
"""

import dataclasses
import os

import torch
from safetensors import SafetensorError

from .atomic_io import read_tensor_file, tensors_digest, write_tensor_file
from .memory_fields import torch_dtype
from .memory_store import LongTermStoreError

RECALL_FLOOR = 0.01  # official: recall frequencies <= 0.01 count as zero (float residue of repeated decay)
MPLUS_FORMAT = "memoryllm-hf/mplus-long-term/1"
# Tensors of an M+ long-term memory in a file (LTM layers concatenated along the slot axis; `slot_counts` splits them).
MPLUS_TENSORS = (
    "mplus_slots",
    "mplus_keys",
    "mplus_ages",
    "mplus_recall",
    "mplus_slot_counts",
    "mplus_pending_slots",
    "mplus_pending_keys",
    "mplus_pending_ages",
    "mplus_pool_ages",
    "mplus_commits",
)


class MPlusMemoryError(LongTermStoreError):
    """An M+ long-term memory that must not be used (inconsistent, non-finite, or of another model's shape)."""


@dataclasses.dataclass(frozen=True, eq=False)
class MPlusMemory:
    """The M+ bookkeeping beside the pool [L, N, d] (s: retriever width):

    slots / keys / ages / recall: per layer l the LTM rows [S_l, d], their keys [S_l, s], ages [S_l] (int64) and
        recall frequencies [S_l] (float64, as the official numpy arrays after a merge);
    pending_slots / pending_keys / pending_ages: dropped slots not merged yet [L, P, d], [L, P, s], [L, P] (oldest
        commit first);
    pool_ages: the age of every pool slot [L, N] (int64; the official `memory_ages`);
    commits: commits since the last merge (the official `update_step` / K).
    """

    slots: tuple[torch.Tensor, ...]
    keys: tuple[torch.Tensor, ...]
    ages: tuple[torch.Tensor, ...]
    recall: tuple[torch.Tensor, ...]
    pending_slots: torch.Tensor
    pending_keys: torch.Tensor
    pending_ages: torch.Tensor
    pool_ages: torch.Tensor
    commits: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def slot_counts(self) -> list[int]:
        """LTM slots per layer (pending slots not counted)."""
        return [s.shape[0] for s in self.slots]

    @property
    def num_pending(self) -> int:
        return self.pending_slots.shape[1]

    def __bool__(self) -> bool:  # an M+ memory is always "there", even when it holds no slot yet
        return True

    def __repr__(self) -> str:
        return (f"MPlusMemory(layers={self.num_layers}, ltm slots per layer={self.slot_counts}, "
                f"pending={self.num_pending}, commits since merge={self.commits})")

    def candidate_scores(self, layer: int, queries: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scores [B, C] of layer `layer`'s candidates (its LTM rows, then its pending rows; `retrieval_scores`)."""
        scores = retrieval_scores(queries, mask, self.keys[layer])
        if not self.num_pending:
            return scores
        return torch.cat([scores, retrieval_scores(queries, mask, self.pending_keys[layer])], dim=1)

    def candidate_ages(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """Ages of candidate numbers `indices` (LTM rows first, then pending rows)."""
        ages, pending = self.ages[layer], self.pending_ages[layer].to(self.ages[layer].device)
        indices = indices.to(ages.device)
        inside = indices < ages.shape[0]
        out = torch.empty_like(indices)
        out[inside] = ages[indices[inside]]
        out[~inside] = pending[indices[~inside] - ages.shape[0]]
        return out

    def candidate_slots(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """The slots [len(indices), d] of candidate numbers `indices` (LTM rows first, then pending rows)."""
        ltm = self.slots[layer]
        indices = indices.to(ltm.device)
        pending = self.pending_slots[layer].to(ltm.device)
        inside = indices < ltm.shape[0]
        out = ltm.new_empty(indices.shape[0], ltm.shape[1])
        out[inside] = ltm[indices[inside]]
        out[~inside] = pending[indices[~inside] - ltm.shape[0]].to(ltm.dtype)
        return out

    # ------------------------------------------------------------------ files
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat CPU tensors for a file (see `MPLUS_TENSORS`)."""
        cpu = lambda t: t.detach().cpu().contiguous()  # noqa: E731
        return {
            "mplus_slots": cpu(torch.cat(self.slots)),
            "mplus_keys": cpu(torch.cat(self.keys)),
            "mplus_ages": cpu(torch.cat(self.ages)),
            "mplus_recall": cpu(torch.cat(self.recall)),
            "mplus_slot_counts": torch.tensor(self.slot_counts, dtype=torch.long),
            "mplus_pending_slots": cpu(self.pending_slots),
            "mplus_pending_keys": cpu(self.pending_keys),
            "mplus_pending_ages": cpu(self.pending_ages),
            "mplus_pool_ages": cpu(self.pool_ages),
            "mplus_commits": torch.tensor(self.commits, dtype=torch.long),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "MPlusMemory":
        """The memory written by `to_tensors`; raises MPlusMemoryError for missing or inconsistent tensors."""
        missing = [name for name in MPLUS_TENSORS if name not in tensors]
        if missing:
            raise MPlusMemoryError(f"the M+ long-term memory is incomplete: tensors {missing} are missing")
        counts = tensors["mplus_slot_counts"]
        if counts.dim() != 1 or counts.is_floating_point() or bool((counts < 0).any()):
            raise MPlusMemoryError(f"mplus_slot_counts must be non-negative integers [L], got {counts.tolist()}")
        total = int(counts.sum())
        for name in ("mplus_slots", "mplus_keys", "mplus_ages", "mplus_recall"):
            if tensors[name].shape[0] != total:
                raise MPlusMemoryError(f"{name} has {tensors[name].shape[0]} rows, the slot counts say {total}")
        split = lambda t: tuple(p.clone() for p in torch.split(t, counts.tolist()))  # noqa: E731
        commits = tensors["mplus_commits"]
        if commits.dim() != 0 or commits.is_floating_point():
            raise MPlusMemoryError("mplus_commits must be an integer scalar")
        return cls(
            slots=split(tensors["mplus_slots"]),
            keys=split(tensors["mplus_keys"]),
            ages=split(tensors["mplus_ages"]),
            recall=split(tensors["mplus_recall"]),
            pending_slots=tensors["mplus_pending_slots"],
            pending_keys=tensors["mplus_pending_keys"],
            pending_ages=tensors["mplus_pending_ages"],
            pool_ages=tensors["mplus_pool_ages"],
            commits=int(commits),
        )

    def content_hash(self) -> str:
        """sha256 of the memory's tensors (names, dtypes, shapes, bytes)."""
        return tensors_digest(self.to_tensors())

    def file_metadata(self, fingerprint: str | None = None) -> dict[str, str]:
        """Metadata of its file: format, geometry, counts, content hash (and the model's fingerprint)."""
        metadata = {
            "long_term_store": MPLUS_FORMAT,
            "num_layers": str(self.num_layers),
            "hidden_size": str(self.pending_slots.shape[2]),
            "retriever_size": str(self.pending_keys.shape[2]),
            "slot_counts": ",".join(map(str, self.slot_counts)),
            "pending": str(self.num_pending),
            "content_hash": self.content_hash(),
        }
        if fingerprint is not None:
            metadata["fingerprint"] = fingerprint
        return metadata

    def validate(self, num_layers: int, num_slots: int, hidden_size: int, retriever_size: int) -> None:
        """Raise MPlusMemoryError unless it fits a model of this shape: per-layer shapes, integer ages >= 0, finite
        values, recall frequencies above the floor (a merge removes the others)."""
        L, N, d, s = num_layers, num_slots, hidden_size, retriever_size
        per_layer = (self.slots, self.keys, self.ages, self.recall)
        if any(len(part) != L for part in per_layer):
            raise MPlusMemoryError(
                f"the M+ long-term memory has {len(self.slots)} layers, this model {L}: it belongs to another model"
            )
        for layer, (slots, keys, ages, recall) in enumerate(zip(*per_layer, strict=True)):
            S = slots.shape[0]
            shapes = (tuple(slots.shape), tuple(keys.shape), tuple(ages.shape), tuple(recall.shape))
            if shapes != ((S, d), (S, s), (S,), (S,)):
                raise MPlusMemoryError(
                    f"layer {layer} of the M+ long-term memory has slots {tuple(slots.shape)}, keys "
                    f"{tuple(keys.shape)}, ages {tuple(ages.shape)}, recall {tuple(recall.shape)}; this model needs "
                    f"[S, {d}], [S, {s}], [S], [S]: it belongs to another model"
                )
            _check_values(f"layer {layer}", slots, keys, ages)
            if not recall.is_floating_point() or not bool(torch.isfinite(recall).all()):
                raise MPlusMemoryError(f"layer {layer}: recall frequencies must be finite floats")
        P = self.num_pending
        if (tuple(self.pending_slots.shape) != (L, P, d) or tuple(self.pending_keys.shape) != (L, P, s)
                or tuple(self.pending_ages.shape) != (L, P)):
            raise MPlusMemoryError(
                f"pending slots {tuple(self.pending_slots.shape)}, keys {tuple(self.pending_keys.shape)}, ages "
                f"{tuple(self.pending_ages.shape)} do not fit [{L}, P, {d}], [{L}, P, {s}], [{L}, P]"
            )
        _check_values("pending", self.pending_slots, self.pending_keys, self.pending_ages)
        if tuple(self.pool_ages.shape) != (L, N) or self.pool_ages.dtype != torch.long:
            raise MPlusMemoryError(f"pool ages must be int64 [{L}, {N}], got {self.pool_ages.dtype} "
                                   f"{tuple(self.pool_ages.shape)}")
        if self.commits < 0:
            raise MPlusMemoryError(f"commits since the last merge must be >= 0, got {self.commits}")


def _check_values(where: str, slots: torch.Tensor, keys: torch.Tensor, ages: torch.Tensor) -> None:
    if slots.is_meta or not slots.is_floating_point() or not keys.is_floating_point():
        raise MPlusMemoryError(f"{where}: slots and keys must be float tensors holding data")
    if ages.dtype != torch.long or (ages.numel() and int(ages.min()) < 0):
        raise MPlusMemoryError(f"{where}: ages must be int64 >= 0, got {ages.dtype}")
    if not bool(torch.isfinite(slots).all()) or not bool(torch.isfinite(keys).all()):
        raise MPlusMemoryError(f"{where}: slots or keys hold NaN/inf")


def empty_mplus_memory(
    num_layers: int, num_slots: int, hidden_size: int, retriever_size: int, dtype=torch.float32, device="cpu"
) -> MPlusMemory:
    """An M+ memory with no long-term or pending slot and all pool ages 0 (the official start after loading)."""
    L = num_layers
    empty = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)  # noqa: E731
    return MPlusMemory(
        slots=tuple(empty(0, hidden_size) for _ in range(L)),
        keys=tuple(empty(0, retriever_size) for _ in range(L)),
        ages=tuple(empty(0, dt=torch.long) for _ in range(L)),
        recall=tuple(empty(0, dt=torch.float64) for _ in range(L)),
        pending_slots=empty(L, 0, hidden_size),
        pending_keys=empty(L, 0, retriever_size),
        pending_ages=empty(L, 0, dt=torch.long),
        pool_ages=torch.zeros(L, num_slots, dtype=torch.long),
    )


# ---------------------------------------------------------------------------------------------- the update rule
def pool_ages_after(pool_ages: torch.Tensor, sources: torch.Tensor, num_new: int) -> torch.Tensor:
    """Ages [L, N] of the pool after a commit. `sources` [L, N]: where each new pool slot comes from (>= 0: that old
    slot, which keeps its age; -(j+1): new slot j of `num_new`, which gets age num_new-1-j: the newest is 0)."""
    old = pool_ages.gather(1, sources.clamp(min=0))
    fresh = num_new - 1 - (-sources - 1)
    return torch.where(sources >= 0, old, fresh)


def after_commit(
    memory: MPlusMemory,
    sources: torch.Tensor,
    dropped: torch.Tensor,
    dropped_slots: torch.Tensor,
    dropped_keys: torch.Tensor,
    num_new: int,
    config,
) -> MPlusMemory:
    """The M+ memory after one commit (official `update_memory_with_delta_memory`, update_ltm_mode "immediate").

    sources [L, N]: origin of every new pool slot (see `pool_ages_after`); dropped [L, q]: the old pool slots that
    left (ascending); dropped_slots [L, q, d] and dropped_keys [L, q, s]: those slots and their keys computed now.
    Every LTM and pending age grows by K; the dropped slots join the pending ones with their pool age; on every
    `long_term_merge_every`-th commit the pending slots are merged (`merged`).
    """
    grow = config.num_update_tokens
    dropped_ages = memory.pool_ages.gather(1, dropped.to(memory.pool_ages.device))
    pending_device, slot_dtype = memory.pending_slots.device, memory.pending_slots.dtype
    state = dataclasses.replace(
        memory,
        ages=tuple(a + grow for a in memory.ages),
        pending_slots=torch.cat([memory.pending_slots, dropped_slots.to(pending_device, slot_dtype)], 1),
        pending_keys=torch.cat([memory.pending_keys, dropped_keys.to(pending_device, memory.pending_keys.dtype)], 1),
        pending_ages=torch.cat([memory.pending_ages + grow, dropped_ages.to(memory.pending_ages.device)], 1),
        pool_ages=pool_ages_after(memory.pool_ages, sources.to(memory.pool_ages.device), num_new),
        commits=memory.commits + 1,
    )
    if state.commits >= config.long_term_merge_every:
        state = merged(state, config.read_tokens, config.recall_initial, config.recall_decay)
    return state


def merged(memory: MPlusMemory, read_tokens: int, recall_initial: float, recall_decay: float) -> MPlusMemory:
    """The memory after merging its pending slots into the LTM (official `update_ltm`), layer by layer: append them
    with recall frequency `recall_initial`, decay every frequency by `recall_decay`, remove the slots at or below
    `RECALL_FLOOR` unless at most `read_tokens` would remain (then keep all and undo the decay)."""
    slots, keys, ages, recall = [], [], [], []
    for layer in range(memory.num_layers):
        device = memory.slots[layer].device
        keep, r = merge_survivors(memory.recall[layer], memory.num_pending, read_tokens, recall_initial, recall_decay)
        keep = keep.to(device)
        s = torch.cat([memory.slots[layer], memory.pending_slots[layer].to(device, memory.slots[layer].dtype)])
        k = torch.cat([memory.keys[layer], memory.pending_keys[layer].to(device, memory.keys[layer].dtype)])
        a = torch.cat([memory.ages[layer], memory.pending_ages[layer].to(device)])
        slots.append(s[keep])
        keys.append(k[keep])
        ages.append(a[keep])
        recall.append(r)
    L, d, width = memory.num_layers, memory.pending_slots.shape[2], memory.pending_keys.shape[2]
    device = memory.pending_slots.device
    return dataclasses.replace(
        memory,
        slots=tuple(slots),
        keys=tuple(keys),
        ages=tuple(ages),
        recall=tuple(recall),
        pending_slots=memory.pending_slots.new_zeros(L, 0, d),
        pending_keys=memory.pending_keys.new_zeros(L, 0, width),
        pending_ages=torch.zeros(L, 0, dtype=torch.long, device=device),
        commits=0,
    )


def merge_survivors(
    recall: torch.Tensor, num_pending: int, read_tokens: int, recall_initial: float, recall_decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's merge on its recall frequencies [S] and `num_pending` newcomers: (rows of `[LTM; pending]` that
    stay, ascending; their recall frequencies after the merge, float64 as the official numpy arrays)."""
    fresh = torch.full((num_pending,), float(recall_initial), dtype=torch.float64)
    decayed = torch.cat([recall.to(torch.float64).cpu(), fresh]) - recall_decay
    keep = torch.nonzero(decayed > RECALL_FLOOR).squeeze(1)
    if keep.numel() > read_tokens:
        return keep, decayed[keep]
    return torch.arange(decayed.numel()), decayed + recall_decay


# ---------------------------------------------------------------------------------------------- retrieval
def retrieval_scores(queries: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Official M+ score [B, C] of C candidate keys [C, s] for prompt rows with queries [B, T, s] (T tokens, `mask`
    [B, T] True for real tokens): the mean over a row's tokens of sigmoid(q_t . key) (no 1/sqrt(s), keys not
    normalised). Computed in float32."""
    weights = torch.sigmoid(queries.float() @ keys.to(queries.device).float().T)  # [B, T, C]
    if bool(mask.all()):
        return weights.mean(1)
    mask = mask.to(weights.device, weights.dtype)[..., None]
    return (weights * mask).sum(1) / mask.sum(1).clamp(min=1)


def top_candidates(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k best of `scores` [C]; among equal scores at the boundary the lower index wins
    (`torch.topk` leaves that choice undefined)."""
    if k >= scores.shape[0]:
        return torch.arange(scores.shape[0], device=scores.device)
    threshold = torch.topk(scores, k).values[-1]
    above = torch.nonzero(scores > threshold).squeeze(1)
    tied = torch.nonzero(scores == threshold).squeeze(1)[: k - above.numel()]
    return torch.cat([above, tied]).sort().values


def read_order(indices: torch.Tensor, ages: torch.Tensor) -> torch.Tensor:
    """`indices` (ascending) reordered for reading by their `ages` (same length): age descending (the oldest slot
    first, so the retrieved block is chronological). Equal ages: the higher index first, which is what the official
    `indices[argsort(ages)[::-1]]` gives with a stable sort; numpy's default sort is not stable, so there the order
    among equal ages is undefined."""
    return indices.flip(0)[torch.sort(ages.flip(0), descending=True, stable=True).indices]


def retrieve(memory: MPlusMemory, layer: int, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k candidate indices ascending, the same in read order) for one row's `scores` [C] in layer `layer`."""
    top = top_candidates(scores, k)
    return top, read_order(top, memory.candidate_ages(layer, top).to(top.device))


def load_mplus_memory(path, fingerprint: str | None = None) -> MPlusMemory:
    """Read an M+ long-term memory file (`long_term_memory.safetensors` of an M+ model); refuses a truncated or
    corrupted file, a hash mismatch, another format, and (when both are known) another model's memory."""
    path = os.fspath(path)
    try:
        tensors, metadata = read_tensor_file(path)
    except (SafetensorError, OSError) as err:
        raise MPlusMemoryError(f"{path} is truncated or corrupted ({err}); restore it from a backup") from err
    return decode_mplus_file(path, tensors, metadata, fingerprint)


def decode_mplus_file(path, tensors: dict, metadata: dict, fingerprint: str | None = None) -> MPlusMemory:
    """The checked M+ memory of a file's (tensors, metadata) (see `load_mplus_memory`)."""
    extra = sorted(set(tensors) - set(MPLUS_TENSORS))
    if extra or metadata.get("long_term_store") != MPLUS_FORMAT:
        raise MPlusMemoryError(
            f"{path} is not an M+ long-term memory (format {metadata.get('long_term_store')!r}, unexpected tensors "
            f"{extra[:5]})"
        )
    recorded = metadata.get("fingerprint")
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise MPlusMemoryError(
            f"{path} belongs to another model (fingerprint {recorded}, this model's is {fingerprint})"
        )
    memory = MPlusMemory.from_tensors(tensors)
    if metadata.get("content_hash") != memory.content_hash():
        raise MPlusMemoryError(f"{path} is corrupted: its content differs from the hash recorded when it was saved")
    return memory


def save_mplus_memory(path, memory: MPlusMemory, fingerprint: str | None = None) -> None:
    """Write the memory to one safetensors file, atomically, with its hash (and the model's fingerprint)."""
    write_tensor_file(os.fspath(path), memory.to_tensors(), memory.file_metadata(fingerprint))


def empty_long_term(config, dtype: torch.dtype):
    """The long-term memory of an empty model with `config`: an empty `MPlusMemory` when it has an M+ retriever (its
    slots in `long_term_memory_dtype`, default `dtype`, on `long_term_memory_device`, default the CPU), else the
    empty block store `()`."""
    if not getattr(config, "retriever_size", 0):
        return ()
    slot_dtype = torch_dtype(config.long_term_memory_dtype) or dtype
    return empty_mplus_memory(
        config.num_hidden_layers, config.num_memory_tokens, config.hidden_size, config.retriever_size, slot_dtype,
        config.long_term_memory_device or "cpu",
    )
