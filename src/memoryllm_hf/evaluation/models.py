"""Loading the model under evaluation: `default` (SmolLM2, training-free memory), `tiny` (random, CI), a trained
adapter folder (`OUT/adapter` of `memoryllm_hf.train`) or a saved MemoryLlama folder."""

import json

from ..loading import config_fields, load

# Memory settings the command line may override (None = keep the model's own).
MEMORY_FLAGS = ("num_memory_tokens", "num_update_tokens", "memory_update", "fresh_pool")
# How the model reads its memory, recorded where its config has these fields.
READ_FIELDS = ("read_mode", "long_term_memory_tokens", "long_term_memory_dtype", "read_tokens", "retrieval_threshold",
               "retrieval_margin", "retrieval_likelihood_weight", "retrieval_likelihood_gain",
               "retrieval_neighbors", "read_placement")
# ... and those recorded only when on (added after runs began: a log written before still resumes with them off)
READ_SWITCHES = ("retrieval_subject_gate",)


def parse_overrides(pairs: list[str]) -> dict:
    """`["key=value", ...]` (from `--set`) -> {key: value}; values are read as JSON where they parse (numbers,
    true/false, null), else kept as text."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE (a field of the model's config), got {pair!r}")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = value
    return overrides


def check_overrides(config_class, overrides: dict, config=None) -> None:
    """Refuse overrides of fields `config_class` does not declare, and (given the built `config`) overrides it did
    not take."""
    unknown = sorted(set(overrides) - config_fields(config_class))
    if unknown:
        hint = " (this model has no read modes: drop --read-mode)" if "read_mode" in unknown else ""
        raise ValueError(
            f"the model's config ({config_class.__name__}) has no field {', '.join(map(repr, unknown))}{hint}; "
            "--set/--read-mode only change fields the model has"
        )
    ignored = {} if config is None else {k: getattr(config, k) for k, v in overrides.items() if getattr(config, k) != v}
    if ignored:
        raise ValueError(f"the model did not take the config overrides {overrides}: it has {ignored}")


def load_model(
    spec: str, device: str = "cpu", dtype: str = "float32", seed: int = 0, overrides: dict | None = None, **memory
):
    """(model in eval mode on `device`/`dtype`, tokenizer, description) for `spec` = default | tiny | adapter folder
    | model folder (see `memoryllm_hf.load`). `memory` holds MEMORY_FLAGS overrides; a saved model keeps its pool
    shape (N/K overrides apply to `default`, `tiny` and adapter folders only). `overrides` sets other config fields
    (`--set`, `--read-mode`); a field the model's config does not declare is an error (checked before the weights
    load where the config class is known)."""
    overrides = dict(overrides or {})
    if overrides and spec in ("default", "smollm2", "tiny"):
        from ..modeling import MemoryLlamaConfig

        check_overrides(MemoryLlamaConfig, overrides)  # before SmolLM2's weights load
    model, tokenizer = load(spec, device=device, dtype=dtype, seed=seed, **memory, **overrides)
    if not hasattr(model, "inject"):
        raise ValueError(f"{spec} is not a MemoryLlama model (no inject()); convert it with `memoryllm-hf convert`")
    check_overrides(type(model.config), overrides, model.config)
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
        "read": {
            **{key: getattr(cfg, key) for key in READ_FIELDS if key in config_fields(type(cfg))},
            **{key: True for key in READ_SWITCHES if getattr(cfg, key, False)},
        },
    }
