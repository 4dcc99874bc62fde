"""Loading the model under evaluation: `default` (SmolLM2, training-free memory), `tiny` (random, CI), a trained
adapter folder (`OUT/adapter` of `memoryllm_hf.train`) or a saved MemoryLlama folder."""

import dataclasses
import json

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Memory settings the command line may override (None = keep the model's own).
MEMORY_FLAGS = ("num_memory_tokens", "num_update_tokens", "memory_update", "fresh_pool")
# How the model reads its memory, recorded where its config has these fields.
READ_FIELDS = ("read_mode", "long_term_memory_tokens", "read_tokens", "retrieval_threshold")


def char_tokenizer():
    """A character-level tokenizer (printable ASCII + newline, ids < 100) with a chat template, for tiny models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{ch: i + 4 for i, ch in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


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


def config_fields(config_class) -> set[str]:
    """The fields a config class declares (a value set on a config that lacks the field would be ignored)."""
    if dataclasses.is_dataclass(config_class):
        return {field.name for field in dataclasses.fields(config_class)}
    return {name for name in dir(config_class) if not name.startswith("_")}


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
    | model folder.

    `memory` holds MEMORY_FLAGS overrides; a saved model's memory config can only be overridden where the pool
    shape stays the same (update rule), so N/K overrides apply to `default`, `tiny` and adapter folders only.
    `overrides` sets other config fields (`--set`, `--read-mode`) when the model is built; a field the model's
    config does not declare is an error (checked before the weights load where the config class is known).
    """
    overrides = dict(overrides or {})
    if overrides and spec in ("default", "tiny"):
        from ..modeling import MemoryLlamaConfig

        check_overrides(MemoryLlamaConfig, overrides)  # before SmolLM2's weights load
    memory = {key: value for key, value in memory.items() if value is not None}
    memory.update(overrides)
    if spec == "default":
        from ..default_model import load_default_model

        model, tokenizer = load_default_model(**memory)
    elif spec == "tiny":
        from ..tiny import tiny_model

        model, tokenizer = tiny_model(seed=seed, **memory), char_tokenizer()
    elif _is_adapter_folder(spec):
        from ..training.checkpoint import load_trained_model

        model, tokenizer = load_trained_model(spec, **memory)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        shape = {key: memory.pop(key) for key in ("num_memory_tokens", "num_update_tokens") if key in memory}
        if shape:
            raise ValueError(f"{sorted(shape)} cannot be changed on a saved model; convert it again instead")
        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=True, **memory)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    if not hasattr(model, "inject"):
        raise ValueError(f"{spec} is not a MemoryLlama model (no inject()); convert it with `memoryllm-hf convert`")
    check_overrides(type(model.config), overrides, model.config)
    model = model.to(device=torch.device(device), dtype=DTYPES[dtype]).eval()
    return model, tokenizer, describe(model, spec)


def _is_adapter_folder(spec: str) -> bool:
    from ..training.checkpoint import is_adapter_folder  # training imports accelerate: only when a folder is given

    return is_adapter_folder(spec)


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
        "read": {key: getattr(cfg, key) for key in READ_FIELDS if key in config_fields(type(cfg))},
    }
