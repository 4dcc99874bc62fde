"""Memory settings: every MemoryLlamaConfig field that shapes, places or reads the memory, checked in one place.

`check_memory_settings(config, READS)` runs when a config is built (config.json, keyword arguments) and again on
every path that acts on the settings: the model's construction (after `from_pretrained` overrides), every read,
`inject` and `save_pretrained`. A value set later on `model.config` is refused where it would act, never half
used. A bad value gets a ValueError naming the field, what it got and what to pass.

Whether `long_term_memory_device` exists is a property of the machine, not of the config: it is checked when a model
is built and used (`on_this_machine=True`), so `from_pretrained(..., long_term_memory_device="cpu")`,
`memoryllm_hf.load(folder, device="cpu")` or `--device cpu` can override a config.json written on another machine.

`store_dtype` / `store_device` turn the store's placement settings into torch objects.
"""

import math
import numbers
from collections.abc import Mapping

import torch

from .memory_fields import DTYPE_NAMES, dtype_name, torch_dtype
from .memory_retrieval import check_weights

MEMORY_UPDATE_MODES = ("output", "input")
FRESH_POOL_MODES = ("tile", "grow")
STORE_STORAGES = ("memory", "disk")  # the long-term store in memory, or memory-mapped segment files
STORE_DTYPES = DTYPE_NAMES  # what the long-term store keeps (a float64 model stores float32)
INTEGER_SETTINGS = (
    "num_memory_tokens", "num_update_tokens", "min_inject_tokens", "inject_chunk_size", "memory_seed",
    "long_term_memory_tokens", "read_tokens", "retrieval_neighbors",
)
BOOLEAN_SETTINGS = (
    "add_bos_embedding", "drop_memory_per_layer", "positional_emb_on_first_injection", "add_decoder_lora"
)


def setting_value(name: str, value):
    """The value a config keeps for a field set to `value`: torch objects become their names (`torch.float16` ->
    "float16", `torch.device("cpu")` -> "cpu") and other integer types `int`, so the config stays JSON."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, torch.device):
        return str(value)
    if name in INTEGER_SETTINGS and isinstance(value, numbers.Integral) and not isinstance(value, (int, bool)):
        return int(value)
    return value


def check_memory_settings(config, reads: Mapping, on_this_machine: bool = False) -> None:
    """Raise ValueError unless every memory setting of `config` is usable (`reads`: the table of read modes, whose
    entry for `config.read_mode` checks what that read needs; `on_this_machine`: the store's device exists here)."""
    for name in INTEGER_SETTINGS:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    for name in BOOLEAN_SETTINGS:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be true or false, got {getattr(config, name)!r}")
    _check_choice(config, "memory_update", MEMORY_UPDATE_MODES)
    _check_choice(config, "fresh_pool", FRESH_POOL_MODES)
    _check_choice(config, "read_mode", tuple(reads))
    K, N = config.num_update_tokens, config.num_memory_tokens
    if not 0 < K <= N:
        raise ValueError(f"need 0 < num_update_tokens (K={K}) <= num_memory_tokens (N={N})")
    if config.min_inject_tokens < 1 or config.inject_chunk_size < config.min_inject_tokens:
        raise ValueError("need 1 <= min_inject_tokens <= inject_chunk_size")
    if config.read_tokens < 1:
        raise ValueError(f"read_tokens must be an integer >= 1, got {config.read_tokens!r}")
    tokens = config.long_term_memory_tokens
    if tokens < 0 or 0 < tokens < K:
        raise ValueError(f"long_term_memory_tokens must be 0 (off) or >= num_update_tokens ({K}), got {tokens!r}")
    reads[config.read_mode].check_config(config)
    # Every injection read takes at least one slot of the read budget: more neighbours can never be read (and each
    # one would cost a loop step per read).
    limit = min(config.read_tokens, tokens) if tokens else config.read_tokens
    if not 0 <= config.retrieval_neighbors <= limit:
        raise ValueError(
            f"retrieval_neighbors must be an integer in [0, {limit}] (a read holds at most read_tokens="
            f"{config.read_tokens} slots of a store of long_term_memory_tokens={tokens}), "
            f"got {config.retrieval_neighbors!r}"
        )
    for name in ("retrieval_threshold", "retrieval_margin", "retrieval_likelihood_gain",
                 "retrieval_likelihood_weight"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number or None (no threshold), got {value!r}")
    if not isinstance(config.retrieval_subject_gate, bool):
        raise ValueError(f"retrieval_subject_gate must be True or False, got {config.retrieval_subject_gate!r}")
    if config.retrieval_margin is not None and config.retrieval_margin < 0:
        raise ValueError(f"retrieval_margin must be >= 0 or None, got {config.retrieval_margin!r}")
    weights = config.retrieval_weights
    if weights is not None:
        if not isinstance(weights, dict):
            raise ValueError(f"retrieval_weights must be a dict (scorer name -> weight) or None, got {weights!r}")
        check_weights(weights)
        if not all(math.isfinite(value) for value in weights.values()):
            raise ValueError(f"retrieval_weights must be finite numbers, got {weights!r}")
    layers = config.retrieval_key_layers
    if layers is not None and (
        not isinstance(layers, (list, tuple))
        or not all(type(i) is int and 0 <= i < config.num_hidden_layers for i in layers)
    ):
        raise ValueError(f"retrieval_key_layers must be None or a list of layer indices in [0, "
                         f"{config.num_hidden_layers}), got {layers!r}")
    dtype = config.long_term_memory_dtype
    if dtype is not None and dtype not in STORE_DTYPES:
        raise ValueError(
            f"long_term_memory_dtype must be None (the model's dtype) or one of {STORE_DTYPES}, got {dtype!r}"
        )
    _check_choice(config, "long_term_memory_storage", STORE_STORAGES)
    if config.long_term_memory_storage == "disk" and config.long_term_memory_device not in (None, "cpu"):
        raise ValueError("a disk-backed long-term store (long_term_memory_storage='disk') lives on the CPU: "
                         "set long_term_memory_device=None")
    if config.long_term_memory_device is not None:
        check_device(config.long_term_memory_device, on_this_machine, "long_term_memory_device")


def _check_choice(config, name: str, choices: tuple) -> None:
    value = getattr(config, name)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_device(device, on_this_machine: bool = True, name: str = "device") -> torch.device:
    """`device` (a name such as "cpu", "cuda:1", or a torch.device) as a torch.device; ValueError (saying what to pass)
    for a name that is not a device, the meta device (it holds no data) and, `on_this_machine`, a device this machine
    does not have. `name` is the setting or argument that gave it."""
    how = ("pass another one: memoryllm_hf.load(folder, device='cpu'), --device cpu on the command line, or "
           "from_pretrained(..., long_term_memory_device='cpu'); or set long_term_memory_device to null (the CPU) in "
           "config.json")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{name} must be a device name such as 'cpu' or 'cuda:0', got {device!r} "
                         f"({type(device).__name__})")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{name}={device!r} is not a device name; use 'cpu', 'cuda', 'cuda:1', ...") from None
    if parsed.type == "meta":
        raise ValueError(f"{name}='meta' holds no data (memory kept there would be lost); use 'cpu' or 'cuda'")
    if not on_this_machine or parsed.type == "cpu":
        return parsed
    try:
        backend = torch.get_device_module(parsed.type)
    except (RuntimeError, AttributeError):  # a device type without a torch module here
        backend = None
    available = getattr(backend, "is_available", lambda: False)()
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if not available or (parsed.index is not None and parsed.index >= count):
        raise ValueError(
            f"{name}={str(device)!r} is not on this machine ({count} {parsed.type} device{'s' * (count != 1)}): {how}"
        )
    return parsed


def store_dtype(config, pool_dtype: torch.dtype) -> torch.dtype:
    """The dtype stored blocks take: `long_term_memory_dtype`, or the pool's (float32 for a pool in a dtype the store
    does not keep, e.g. float64)."""
    name = config.long_term_memory_dtype
    if name is None:
        name = dtype_name(pool_dtype) if dtype_name(pool_dtype) in STORE_DTYPES else "float32"
    if name not in STORE_DTYPES:
        raise ValueError(f"long_term_memory_dtype must be None or one of {STORE_DTYPES}, got {name!r}")
    return torch_dtype(name)


def store_device(config) -> torch.device:
    """The device stored blocks live on: `long_term_memory_device`, or the CPU."""
    return check_device(config.long_term_memory_device or "cpu", True, "long_term_memory_device")


def check_store_dtype(dtype: torch.dtype, what: str, error: type[ValueError] = ValueError) -> None:
    """Raise `error` for stored slots in a dtype the store does not keep (a float64 store is forged or foreign)."""
    if dtype_name(dtype) not in STORE_DTYPES:
        raise error(f"{what} holds {dtype_name(dtype)} slots; a store keeps {STORE_DTYPES}: "
                         "the file was not written by this library")
