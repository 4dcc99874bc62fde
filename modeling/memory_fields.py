"""The memory field table: every tensor of a memory pool state (name, model buffer, dtype rule, shape rule, fresh value,
saved or not), read by the model's buffers, `_init_weights`, `reset_memory`, `MemoryState` and the memory file
format; the dtype helper of the remote code; the error for a memory that must not be used.

Adding a field to the pool state is one `MemoryField` entry in `MEMORY_FIELDS` (plus its attribute on `MemoryState`,
which `tests/test_memory_state.py` keeps in step with this table). The long-term store is not a pool tensor: it has
its own value (`memory_store`) and file (`memory_files`).
"""

import dataclasses
from collections.abc import Callable

import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name ("bfloat16"), a torch dtype, or None (None stays None): the one name -> dtype
    rule of the remote code (configs and files store names)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"{dtype!r} is not a torch dtype name (use one of {DTYPE_NAMES})")
    return value


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (the spelling of configs and file metadata)."""
    return str(dtype).removeprefix("torch.")


def seeded_rng_state(seed: int) -> torch.Tensor:
    """State of a fresh CPU generator seeded with `seed` (what a new pool starts from)."""
    return torch.Generator().manual_seed(seed).get_state()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN/inf. Its float32 sum is finite exactly when it does (NaN and inf
    propagate through additions); only a sum that overflows needs the element-wise check (~20x slower)."""
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


RNG_STATE_BYTES = torch.Generator().get_state().numel()

Geometry = tuple[int, int, int]  # (layers L, slots per layer N, hidden size d)


@dataclasses.dataclass(frozen=True)
class MemoryField:
    """One tensor of a memory pool state.

    `name`: its `MemoryState` attribute; `buffer`: the model buffer (and tensor name in the memory file);
    `dtype`: its dtype given the pool's dtype; `shape`: its shape given the geometry (L, N, d); `fresh`: its value in
    an empty memory (geometry, pool dtype, seed); `required`: files must hold it (False: older files may lack it and
    get the fresh value); `saved`: written to memory files and checkpoints.
    """

    name: str
    buffer: str
    dtype: Callable[[torch.dtype], torch.dtype]
    shape: Callable[[Geometry], tuple[int, ...]]
    fresh: Callable[[Geometry, torch.dtype, int], torch.Tensor]
    required: bool = True
    saved: bool = True
    per_slot: bool = False


def _pool_dtype(pool: torch.dtype) -> torch.dtype:
    return pool


def _fixed(dtype: torch.dtype) -> Callable[[torch.dtype], torch.dtype]:
    return lambda pool: dtype


def _zeros(field_dtype: torch.dtype | None, shape: Callable[[Geometry], tuple]) -> Callable:
    return lambda geometry, pool, seed: torch.zeros(shape(geometry), dtype=field_dtype or pool)


def _pool_shape(geometry: Geometry) -> tuple[int, ...]:
    return geometry


def _scalar(geometry: Geometry) -> tuple[int, ...]:
    return ()


def _rng_shape(geometry: Geometry) -> tuple[int, ...]:
    return (RNG_STATE_BYTES,)


def _per_slot(geometry: Geometry) -> tuple[int, ...]:
    return geometry[:2]


MEMORY_FIELDS: tuple[MemoryField, ...] = (
    # the pool [L, N, d]; filled slots sit at its end
    MemoryField("memory", "memory", _pool_dtype, _pool_shape, _zeros(None, _pool_shape), per_slot=True),
    # how many slots (at the end of the pool) hold memories
    MemoryField("filled", "memory_filled", _fixed(torch.long), _scalar, _zeros(torch.long, _scalar)),
    # injections made so far
    MemoryField("injections", "memory_injections", _fixed(torch.long), _scalar, _zeros(torch.long, _scalar)),
    # the CPU generator that picks dropped slots (seeded: a fresh pool drops the same slots every time)
    MemoryField("rng_state", "memory_rng_state", _fixed(torch.uint8), _rng_shape, lambda g, p, s: seeded_rng_state(s)),
    # [L, N]: the injection (1, 2, ...) that wrote each slot; 0 = unknown (absent from older files)
    MemoryField(
        "written_at", "memory_written_at", _fixed(torch.long), _per_slot, _zeros(torch.long, _per_slot), required=False,
        per_slot=True,
    ),
)
FIELD_NAMES = tuple(field.name for field in MEMORY_FIELDS)
# Model buffers that make up a memory state (saved together in their own safetensors file).
MEMORY_BUFFERS = tuple(field.buffer for field in MEMORY_FIELDS if field.saved)
REQUIRED_BUFFERS = tuple(field.buffer for field in MEMORY_FIELDS if field.saved and field.required)
SLOT_BUFFERS = tuple(field.buffer for field in MEMORY_FIELDS if field.saved and field.per_slot)


def config_geometry(config) -> Geometry:
    """(L, N, d) of a MemoryLlama config."""
    return config.num_hidden_layers, config.num_memory_tokens, config.hidden_size


def fresh_tensors(geometry: Geometry, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """`{field name: value}` of an empty memory of this geometry and pool dtype (generator seeded with `seed`)."""
    return {field.name: field.fresh(geometry, dtype, seed) for field in MEMORY_FIELDS}



class MemoryStateError(ValueError):
    """A memory state that must not be used: truncated or corrupted, non-finite, or made for another model."""


class MemoryChangedOnDiskError(MemoryStateError):
    """The memory saved in a folder changed since it was loaded (another process saved it): not overwritten."""
