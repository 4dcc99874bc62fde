"""Where a MemoryLlama comes from: "default" (SmolLM2-135M-Instruct with a training-free memory), "tiny" (random,
for tests and smoke runs), a saved MemoryLlama folder or Hub id, or a plain Llama folder or Hub id (wrapped with a
fresh training-free memory). `memoryllm_hf.load` is the entry point; training builds its model from here too."""

from pathlib import Path

DEFAULT_ALIASES = ("default", "smollm2")
# Pool-shape settings: fixed once a MemoryLlama is saved (its memory file has that shape).
POOL_SHAPE = ("num_memory_tokens", "num_update_tokens")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_base(source: str, seed: int = 0, dtype=None, device=None, **memory):
    """(model, tokenizer) for `source` with `memory` (MemoryLlamaConfig fields) applied; `dtype` is the load dtype
    (a torch dtype or None for the checkpoint's). `device`, where the model will run, also replaces a
    `long_term_memory_device` recorded in a saved model's config.json (a folder written on another machine loads
    here). Not moved, not put in eval mode (see `memoryllm_hf.load`). The tokenizer is None for a local folder saved
    without one."""
    from .modeling import MemoryLlamaForCausalLM

    source = str(source)
    if source in DEFAULT_ALIASES:
        from transformers import AutoTokenizer

        from .default_model import DEFAULT_MEMORY, smollm2_base_folder

        folder = smollm2_base_folder()
        load = {"dtype": dtype} if dtype is not None else {}
        model = MemoryLlamaForCausalLM.from_base(folder, **load, **{**DEFAULT_MEMORY, **memory})
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model.retrieval_tokenizer = tokenizer  # text retrieval decodes stored token ids with it
        return model, tokenizer
    if source == "tiny":
        from .tiny import tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model(seed=seed, **memory), tiny_tokenizer()
        model.retrieval_tokenizer = tokenizer
        return (model if dtype is None else model.to(dtype)), tokenizer
    return _load_checkpoint(source, dtype, memory, device)


def _load_checkpoint(source: str, dtype, memory: dict, device=None):
    from transformers import AutoTokenizer, PretrainedConfig

    from .modeling import MemoryLlamaConfig, MemoryLlamaForCausalLM

    if not Path(source).exists() and source.count("/") != 1:
        raise ValueError(
            f"{source!r} is neither 'default', 'tiny', a folder nor a Hub id (user/name); check the path"
        )
    config = PretrainedConfig.get_config_dict(source)[0]
    model_type = config.get("model_type")
    load = {"dtype": dtype} if dtype is not None else {}
    if model_type == "llama":
        model = MemoryLlamaForCausalLM.from_base(source, **load, **memory)
    elif model_type == MemoryLlamaConfig.model_type:
        shape = sorted(key for key in POOL_SHAPE if key in memory)
        if shape:
            raise ValueError(f"{shape} cannot be changed on a saved model; convert it again instead")
        if device is not None and config.get("long_term_memory_device") is not None:
            memory.setdefault("long_term_memory_device", str(device))
        model = MemoryLlamaForCausalLM.from_pretrained(source, **load, **memory)
    else:
        raise ValueError(
            f"{source} holds a {model_type!r} model, not MemoryLlama or Llama; convert it with `memoryllm-hf convert`"
        )
    local = Path(source).is_dir()
    if local and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return model, None
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.retrieval_tokenizer = tokenizer
    return model, tokenizer
