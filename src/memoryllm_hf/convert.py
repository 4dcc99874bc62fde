"""Convert official MemoryLLM checkpoints (7B style and 8B/8B-chat style) into MemoryLlama folders.

Streams shard by shard (a 39 GB fp32 checkpoint never sits in memory at once), renames keys, moves the memory into
its own file, and writes the config and the remote-code files, so the result loads with
`AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)`.
"""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from .convert_mplus import (
    LONG_TERM_KEY,
    MPLUS_ONLY,
    check_mplus_weights,
    is_mplus_config,
    mplus_config_fields,
    mplus_long_term_memory,
    rename_mplus_key,
)
from .modeling import (
    INDEX_FILE,
    MemoryLlamaConfig,
    MemoryLlamaForCausalLM,
    MemoryState,
    model_owned_files,
    stage_memory_files,
    state_file_groups,
    update_folder,
)

# Official config keys that become MemoryLlama fields (or are dropped as unused by the official code).
_OFFICIAL_ONLY = {
    "num_tokens",
    "num_blocks",
    "num_memory_tokens",
    "interpolate_position_ids",
    "lora_config",
    "add_decoder_lora",
    "drop_memory_per_layer",
    "add_bos_embedding",
    "shrink_to_one_embedding",
    "new_memory_embedding_fullset",
    "split_positional_embedding",
    "add_positional_embedding",
    "delta_memory_ratio",
    "new_delta_memory_length",
    "put_memory_on_cpu",
    "share_position_ids",
    "use_negative_position_ids",
    "max_length",
    "max_seq_length",
    "rope_scaling",
    "rope_theta",
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "auto_map",
    "_name_or_path",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)
_KEY_RULES = [
    (re.compile(r"^(base_model\.model\.)+"), ""),
    (re.compile(r"^(bos_embedding|new_memory_positional_emb)$"), r"memory_embeddings.\1"),
    (re.compile(r"\.base_layer\.weight$"), ".weight"),
    (re.compile(r"\.lora_([AB])\.default\.weight$"), r".adapter_\1.write"),
    (re.compile(r"\.lora_([AB])\.decoder_adapter\.weight$"), r".adapter_\1.read"),
]
_MEMORY_KEYS = {"memory", "initialized"}


def official_config_to_memory_llama(official: dict) -> MemoryLlamaConfig:
    """Map an official config.json (LlamaConfig + MemoryLLM extras) to a MemoryLlamaConfig."""
    if "num_tokens" not in official or "num_blocks" not in official:
        raise ValueError(
            f"not an official MemoryLLM checkpoint (config.json has no num_tokens/num_blocks, model_type "
            f"{official.get('model_type')!r}); wrap a plain Llama with `memoryllm-hf convert SOURCE OUTPUT` "
            "(without --official)"
        )
    K = official["num_tokens"]
    N = official["num_blocks"] * K
    seven_b = "interpolate_position_ids" in official
    max_positions = official["max_position_embeddings"]
    mplus = mplus_config_fields(official) if is_mplus_config(official) else {}
    if mplus:
        rope = mplus.pop("rope_parameters")
        N = mplus.pop("num_memory_tokens")
    elif official.get("interpolate_position_ids"):
        # 7B branch: positions scaled by max_pos / ((num_blocks + 1) K), rotary base hard-coded to 10000.
        factor = max((official["num_blocks"] + 1) * K, max_positions) / max_positions
        rope = {"rope_type": "linear", "factor": factor, "rope_theta": 10000.0}
    else:
        theta = float(official.get("rope_theta", 10000.0))
        scaling = official.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear"):
            raise ValueError(f"official MemoryLLM uses default or linear RoPE, got rope_scaling={scaling}")
        rope = {"rope_type": kind, "rope_theta": theta}
        if kind == "linear":
            rope["factor"] = float(scaling["factor"])
    lora = official.get("lora_config")
    fields = {k: v for k, v in official.items() if k not in _OFFICIAL_ONLY | MPLUS_ONLY}
    return MemoryLlamaConfig(
        **fields,
        rope_parameters=rope,
        num_memory_tokens=N,
        num_update_tokens=K,
        add_bos_embedding=official.get("add_bos_embedding", True),
        drop_memory_per_layer=bool(official.get("drop_memory_per_layer", False)) and not seven_b,
        memory_update="output",
        inject_chunk_size=max(512, K),
        positional_emb_on_first_injection=not seven_b,
        lora_config={k: lora[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")} if lora else None,
        add_decoder_lora=bool(official.get("add_decoder_lora", False)) and bool(lora),
        **mplus,
    )


def rename_official_key(key: str) -> str | None:
    """The MemoryLlama name of an official weight (None: not kept)."""
    return rename_mplus_key(_generic_name(key))


def _is_memory_key(key: str) -> bool:
    """The pool and (M+) the long-term memory: they go into the memory files, not the weights."""
    return key in _MEMORY_KEYS or bool(LONG_TERM_KEY.match(key))


def _weight_names(files: list[Path]) -> set[str] | None:
    """Names of all official weights (renamed like the rest, before renaming M+ parts), read from the safetensors
    headers; None for .bin checkpoints (checked while converting)."""
    if any(path.suffix != ".safetensors" for path in files):
        return None
    names = set()
    for path in files:
        with safe_open(path, "pt") as handle:
            names.update(handle.keys())
    return {_generic_name(name) for name in names}


def _generic_name(key: str) -> str:
    """An official weight name after the renames shared by all official checkpoints (not the M+ ones)."""
    for pattern, replacement in _KEY_RULES:
        key = pattern.sub(replacement, key)
    return key


def _weight_files(src: Path) -> list[Path]:
    for index_name in (INDEX_FILE, "pytorch_model.bin.index.json"):
        if (src / index_name).exists():
            weight_map = json.loads((src / index_name).read_text())["weight_map"]
            return [src / name for name in sorted(set(weight_map.values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (src / single).exists():
            return [src / single]
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or shard index in {src}")


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_official(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Convert an official MemoryLLM checkpoint folder into a MemoryLlama folder (returns `dst`). The folder is
    written beside `dst` and swapped in at the end, so an existing `dst` stays intact until the conversion is done."""
    src, dst = Path(src), Path(dst)
    config = official_config_to_memory_llama(json.loads((src / "config.json").read_text()))
    files = _weight_files(src)
    names = _weight_names(files)
    if config.retriever_size and names is not None:
        check_mplus_weights(names, config, src)  # before anything is written

    def write(staging: str, old: str | None) -> set[str]:
        staging = Path(staging)
        weight_map, memory, seen = {}, {}, set()
        for number, path in enumerate(files, start=1):
            shard = _load_shard(path)
            seen.update(shard)
            memory.update({k: shard.pop(k) for k in [k for k in shard if _is_memory_key(k)]})
            shard = {rename_official_key(k): v for k, v in shard.items()}
            shard = {k: v for k, v in shard.items() if k is not None}
            if dtype is not None:
                shard = {k: v.to(dtype) if v.is_floating_point() else v for k, v in shard.items()}
            name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in shard.items()}, staging / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        if "memory" not in memory:
            raise ValueError(f"{src} has no `memory` tensor: not an official MemoryLLM checkpoint")
        pool = memory["memory"] if dtype is None else memory["memory"].to(dtype)
        expected = (config.num_hidden_layers, config.num_memory_tokens, config.hidden_size)
        if tuple(pool.shape) != expected:
            raise ValueError(f"memory has shape {tuple(pool.shape)}, the config implies {expected}")
        (staging / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        long_term = ()
        if config.retriever_size:
            check_mplus_weights({_generic_name(name) for name in seen}, config, src)
            long_term = mplus_long_term_memory(memory, config, dtype)
        # an empty memory (no injections, slot ages unknown) holding the official pool (and M+ long-term memory)
        filled = config.num_memory_tokens if int(memory.get("initialized", 1)) else 0
        empty = MemoryState.empty(config, dtype=pool.dtype)
        long_term = long_term or empty.long_term
        state = dataclasses.replace(empty, memory=pool, filled=torch.tensor(filled), long_term=long_term)
        state.validate()
        dropped = stage_memory_files(str(staging), str(staging), state_file_groups(state))
        config.dtype = str(pool.dtype).removeprefix("torch.")
        config.architectures = [MemoryLlamaForCausalLM.__name__]
        with torch.device("meta"):
            skeleton = MemoryLlamaForCausalLM(config)
        custom_object_save(skeleton, staging, config=config)
        config.save_pretrained(staging)
        if (src / "generation_config.json").exists():
            GenerationConfig.from_pretrained(src).save_pretrained(staging)
        for name in _TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, staging / name)
        return dropped | model_owned_files(old)

    update_folder(dst, write)
    return dst
