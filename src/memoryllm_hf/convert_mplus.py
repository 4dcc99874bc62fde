"""What converting an official M+ checkpoint (`MPlus`, `YuWangX/mplus-8b`) adds to converting MemoryLLM-8B.

An M+ folder is recognised by its config (`architectures: ["MPlus"]` or the M+ keys `num_ltm_blocks` /
`add_selector`). Its pool holds `(num_blocks - num_ltm_blocks) * num_tokens` slots; `num_ltm_blocks * num_tokens`
long-term slots are read per layer (`read_tokens`). Its weights add per layer the retriever projectors
(`model.layers.{l}.self_attn.query_proj|key_proj` -> `retriever.layers.{l}.*`; `encoder_query_proj` is dropped: only
the official retriever-guided drop uses it, and that path cannot run) and the long-term memory `ltm.{l}`,
`ltm_keys.{l}`, `ltm_ages.{l}`, `ltm_recall_frequencies.{l}`, which go into the memory's own file
(`long_term_memory.safetensors`, an `MPlusMemory`), not into the weights.
"""

import re

import torch

from .modeling import MemoryLlamaConfig, MPlusMemory

# Official M+ config keys with no MemoryLlama field of the same name (mapped below, or unused at inference).
MPLUS_ONLY = {
    "num_ltm_blocks",
    "ltm_initial_size",
    "selector_hidden_dim",
    "num_selector_layers",
    "add_selector",
    "add_encoder_retriever",
    "update_ltm_mode",
    "update_ltm_frequency",
    "decay_frequency",
    "initial_rf_when_moving_stm_to_ltm",
    "detach_hidden_state",
    "map_from_hidden_states",
    "selector_layers",
    "num_ltm_tokens",
}
MPLUS_KEY_RULES = [
    (re.compile(r"^model\.layers\.(\d+)\.self_attn\.(query_proj|key_proj)\."), r"retriever.layers.\1.\2."),
]
DROPPED_KEY = re.compile(r"\.self_attn\.encoder_query_proj\.")
LONG_TERM_KEY = re.compile(r"^(ltm|ltm_keys|ltm_ages|ltm_recall_frequencies)\.(\d+)$")


def is_mplus_config(official: dict) -> bool:
    architectures = official.get("architectures") or []
    return "MPlus" in architectures or "num_ltm_blocks" in official or "add_selector" in official


def mplus_config_fields(official: dict) -> dict:
    """MemoryLlamaConfig fields of an M+ config (beside those shared with MemoryLLM-8B); refuses what the official
    code cannot run."""
    mode = official.get("update_ltm_mode")
    if mode != "immediate":
        raise ValueError(
            f"update_ltm_mode={mode!r}: the official M+ code only runs 'immediate' (other values crash its commit); "
            "this is not a loadable M+ checkpoint"
        )
    if not official.get("add_selector") or not official.get("selector_hidden_dim"):
        raise ValueError("the M+ config has no retriever (add_selector/selector_hidden_dim): its reads cannot run")
    if official.get("selector_layers") is not None:
        raise ValueError("M+ retrievers restricted to some layers (selector_layers) are not supported")
    depth = official.get("num_selector_layers", 1)
    if depth not in (1, 2):
        raise ValueError(f"num_selector_layers={depth}: the official projectors have 1 or 2 layers")
    K = official["num_tokens"]
    blocks, ltm_blocks = official["num_blocks"], official["num_ltm_blocks"]
    if not 0 < ltm_blocks < blocks:
        raise ValueError(f"need 0 < num_ltm_blocks ({ltm_blocks}) < num_blocks ({blocks})")
    theta = float(official.get("rope_theta", 10000.0))
    scaling = dict(official.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {
        "num_memory_tokens": (blocks - ltm_blocks) * K,
        "read_mode": "mplus",
        "read_tokens": ltm_blocks * K,
        "retriever_size": official["selector_hidden_dim"],
        "retriever_depth": depth,
        "long_term_merge_every": official["update_ltm_frequency"],
        "recall_initial": float(official["initial_rf_when_moving_stm_to_ltm"]),
        "recall_decay": float(official["decay_frequency"]),
        "rope_parameters": {"rope_type": kind, "rope_theta": theta, **scaling},
    }


def rename_mplus_key(key: str) -> str | None:
    """The MemoryLlama name of an (already generically renamed) M+ weight; None for a weight that is dropped."""
    if DROPPED_KEY.search(key):
        return None
    for pattern, replacement in MPLUS_KEY_RULES:
        key = pattern.sub(replacement, key)
    return key


def check_mplus_weights(names: set[str], config: MemoryLlamaConfig, src) -> None:
    """Refuse (before anything is written) an M+ checkpoint without its projectors or its long-term memory."""
    layers = range(config.num_hidden_layers)
    projector = "0.weight" if config.retriever_depth == 2 else "weight"
    needed = [f"model.layers.{i}.self_attn.{p}.{projector}" for i in layers for p in ("query_proj", "key_proj")]
    missing = [n for n in needed if n not in names]
    if missing:
        raise ValueError(
            f"{src} is an M+ checkpoint without its retriever projectors ({missing[:3]}...): its reads cannot run; "
            "download the complete checkpoint"
        )
    needed = [f"{part}.{i}" for i in layers for part in ("ltm", "ltm_keys", "ltm_ages", "ltm_recall_frequencies")]
    missing = [n for n in needed if n not in names]
    if missing:
        raise ValueError(
            f"{src} is an M+ checkpoint without its long-term memory ({missing[:4]}...): download the complete "
            "checkpoint (ltm.*, ltm_keys.*, ltm_ages.*, ltm_recall_frequencies.* are part of its weights)"
        )


def mplus_long_term_memory(
    tensors: dict[str, torch.Tensor], config: MemoryLlamaConfig, dtype: torch.dtype | None
) -> MPlusMemory:
    """The checkpoint's long-term memory (`ltm*.{l}` tensors) as an `MPlusMemory`: ages as the official
    `put_ltm_to_numpy` turns them into integers, recall frequencies in float64, no pending slot, pool ages 0 (the
    official start after loading)."""
    L, N, d, s = config.num_hidden_layers, config.num_memory_tokens, config.hidden_size, config.retriever_size
    slots, keys, ages, recall = [], [], [], []
    for layer in range(L):
        rows, row_keys = tensors[f"ltm.{layer}"], tensors[f"ltm_keys.{layer}"]
        age, rf = tensors[f"ltm_ages.{layer}"], tensors[f"ltm_recall_frequencies.{layer}"]
        S = rows.shape[0]
        if rows.shape != (S, d) or row_keys.shape != (S, s) or age.shape != (S,) or rf.shape != (S,):
            raise ValueError(
                f"layer {layer} of the long-term memory has slots {tuple(rows.shape)}, keys {tuple(row_keys.shape)}, "
                f"ages {tuple(age.shape)}, recall frequencies {tuple(rf.shape)}; this model needs [S, {d}], "
                f"[S, {s}], [S], [S]: the long-term memory belongs to another model"
            )
        slot_dtype = dtype or rows.dtype
        slots.append(rows.to(slot_dtype).clone())
        keys.append(row_keys.to(slot_dtype).clone())
        ages.append(age.to(torch.int32).to(torch.long))  # official: `.int()` (truncation)
        recall.append(rf.float().to(torch.float64))  # official: `.float()`, then float64 from the first merge on
    slot_dtype = slots[0].dtype
    memory = MPlusMemory(
        slots=tuple(slots),
        keys=tuple(keys),
        ages=tuple(ages),
        recall=tuple(recall),
        pending_slots=torch.zeros(L, 0, d, dtype=slot_dtype),
        pending_keys=torch.zeros(L, 0, s, dtype=slot_dtype),
        pending_ages=torch.zeros(L, 0, dtype=torch.long),
        pool_ages=torch.zeros(L, N, dtype=torch.long),
    )
    memory.validate(L, N, d, s)
    return memory
