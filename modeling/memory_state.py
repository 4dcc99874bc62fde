"""Memory states: the complete, restorable content of a memory pool, and the model API around them."""

import hashlib
import threading
from dataclasses import dataclass

import torch

# Buffers that make up a memory state; they are saved together in their own safetensors file.
MEMORY_BUFFERS = ("memory", "memory_filled", "memory_injections", "memory_rng_state")


@dataclass
class MemoryState:
    """A complete memory: the pool [L, N, d], how many slots (at its end) hold memories, injections so far,
    and the state of the generator that picks dropped slots."""

    memory: torch.Tensor
    filled: torch.Tensor
    injections: torch.Tensor
    rng_state: torch.Tensor

    def as_buffers(self) -> dict[str, torch.Tensor]:
        return dict(zip(MEMORY_BUFFERS, (self.memory, self.filled, self.injections, self.rng_state)))

    @classmethod
    def from_buffers(cls, buffers: dict[str, torch.Tensor]) -> "MemoryState":
        return cls(*(buffers[name] for name in MEMORY_BUFFERS))

    def clone(self) -> "MemoryState":
        return MemoryState(*(t.detach().clone() for t in self.as_buffers().values()))


def seeded_rng_state(seed: int) -> torch.Tensor:
    """State of a fresh CPU generator seeded with `seed` (what a new pool starts from)."""
    return torch.Generator().manual_seed(seed).get_state()


class MemoryLock:
    """A re-entrant lock around memory updates; copies and pickles as a fresh lock (models stay deep-copyable)."""

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self) -> "MemoryLock":
        self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __deepcopy__(self, memo) -> "MemoryLock":
        return MemoryLock()

    def __reduce__(self):
        return (MemoryLock, ())


class MemoryStateMixin:
    """Memory-state API of MemoryLlama (relies on the model's `_current_state` / `_set_state`)."""

    def memory_fingerprint(self) -> str:
        """Identifies the model a memory belongs to: the pool geometry, the update rule and a digest of the frozen
        norm weights (cheap to compute; differs between base models, survives LoRA training)."""
        cfg = self.config
        digest = hashlib.sha256(
            repr((cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size, cfg.num_update_tokens,
                  cfg.vocab_size, cfg.memory_update, cfg.add_bos_embedding)).encode()
        )
        for layer in self.model.layers:
            digest.update(layer.input_layernorm.weight.detach().float().cpu().numpy().tobytes())
        digest.update(self.model.norm.weight.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def memory_state(self) -> MemoryState:
        """A copy of the current memory (pool, fill level, injections, drop RNG); `load_memory_state` restores it
        exactly, including which slots the next injection drops."""
        return self._current_state().clone()

    def load_memory_state(self, state: MemoryState) -> None:
        """Restore a state from `memory_state()`; its pool shape must match this model's."""
        if tuple(state.memory.shape) != tuple(self.memory.shape):
            raise ValueError(
                f"memory state has shape {tuple(state.memory.shape)}, this model's pool is {tuple(self.memory.shape)}"
            )
        self._set_state(state.clone())
