"""Loading the model under evaluation: `default` (SmolLM2, training-free memory), `tiny` (random, CI), a trained
adapter folder (`OUT/adapter` of `memoryllm_hf.train`) or a saved MemoryLlama folder."""

from ..loading import load

# Memory settings the command line may override (None = keep the model's own).
MEMORY_FLAGS = ("num_memory_tokens", "num_update_tokens", "memory_update", "fresh_pool")


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", seed: int = 0, **memory):
    """(model in eval mode on `device`/`dtype`, tokenizer, description) for `spec` = default | tiny | adapter folder
    | model folder (see `memoryllm_hf.load`). `memory` holds MEMORY_FLAGS overrides; a saved model keeps its pool
    shape (N/K overrides apply to `default`, `tiny` and adapter folders only)."""
    model, tokenizer = load(spec, device=device, dtype=dtype, seed=seed, **memory)
    if not hasattr(model, "inject"):
        raise ValueError(f"{spec} is not a MemoryLlama model (no inject()); convert it with `memoryllm-hf convert`")
    return model, tokenizer, describe(model, spec)


def describe(model, spec: str) -> dict:
    """What the results need to say about the model: source, memory configuration, size, dtype, device."""
    cfg = model.config
    return {
        "spec": spec,
        "name_or_path": getattr(cfg, "_name_or_path", "") or spec,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model.device),
        "window": cfg.max_position_embeddings,
        "memory": {
            key: getattr(cfg, key)
            for key in (*MEMORY_FLAGS, "add_bos_embedding", "inject_chunk_size", "min_inject_tokens", "memory_seed")
        },
        "memory_fingerprint": model.memory_fingerprint(),
    }
