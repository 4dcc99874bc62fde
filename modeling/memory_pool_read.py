"""The pool read (`read_mode="pool"`, the official read): every layer attends to `[bos_l; the filled pool slots]`.

The pool's keys/values are computed once per memory state and weights (`DerivedCache`) and seeded into the
generation cache; batches of several rows share one copy of them (`shared_prefix_attention`).
"""

import torch

from .memory_cache import DerivedCache
from .memory_prefix import (
    PrefixKV,
    extend_attention_mask,
    key_value_weights_fingerprint,
    prefix_key_values,
    record_prefix,
    seeded_cache,
)
from .shared_prefix_attention import SharedPrefixCache, shares_prefix


class PoolRead:
    """Prefix `[bos; pool]`, the same for every row. Caches the pool's keys/values; stale when the pool tensor (its
    storage or version), the number of filled slots, or the bos/norm/k/v weights and adapters change."""

    def __init__(self):
        self.key_values = DerivedCache()

    @staticmethod
    def check_config(config) -> None:
        """The pool read works with every configuration."""

    @staticmethod
    def from_base_defaults(memory_config: dict, base_config) -> None:
        """`from_base` needs nothing more for the pool read."""

    def has_memory(self, model) -> bool:
        return model.memory_is_initialized

    def prefix_key_values(self, model, slots: torch.Tensor | None = None) -> PrefixKV:
        """Keys/values of the memory prefix (the pool, or explicit `slots` [L, k, d]) for the active adapter. The
        pool's are cached; they are computed afresh (with gradient) when gradients can flow into the prefix path."""
        layers, rotary = model.model.layers, model.model.rotary_emb
        if slots is not None or (torch.is_grad_enabled() and needs_grad(model)):
            return prefix_key_values(layers, rotary, model.memory_prefix_hidden(slots))
        with model.memory_lock:
            memory = model.memory
            bos, _ = model.memory_embeddings()
            fingerprint = (memory._version, memory.dtype, memory.device, model.num_filled_slots)
            fingerprint += key_value_weights_fingerprint(layers, bos)

            def compute():
                with torch.no_grad():
                    return prefix_key_values(layers, rotary, model.memory_prefix_hidden())

            return self.key_values.get(memory, fingerprint, compute, limit=1)  # only the current pool's

    def prefix(self, model, input_ids=None, inputs_embeds=None, attention_mask=None):
        """(`[bos; pool]` keys/values [1, kv, P, d], None: every row reads every column) for any prompt batch."""
        return self.prefix_key_values(model), None

    def cache(self, model, batch_size=1, slots=None, read_only=False, max_cache_len=None):
        """A cache pre-filled with the memory prefix for `batch_size` rows (a `StaticCache` of `max_cache_len`
        positions when given); rows share one copy of the pool's prefix (see `model.share_memory_prefix`)."""
        prefix_kv = self.prefix_key_values(model, slots)
        shared = model.share_memory_prefix and slots is None and not read_only and not model.training
        if shared and max_cache_len is None and shares_prefix(model.config, batch_size):
            return record_prefix(SharedPrefixCache(prefix_kv), prefix_kv)
        return seeded_cache(model.config, prefix_kv, batch_size, read_only, max_cache_len)

    def longest_prefix(self, model, slots=None) -> int:
        """Positions the prefix of the next read takes: `[bos; filled pool]` (or `[bos; slots]`)."""
        return model.memory_prefix_length if slots is None else int(model.config.add_bos_embedding) + slots.shape[1]

    def read(self, model, batch, rows: int, slots=None, read_only=False, max_cache_len=None):
        """(cache seeded with `[bos; pool]` (or `[bos; slots]`) for `rows` cache rows, attention mask [B, prefix +
        tokens]) of one prompt batch (`ReadBatch`), taken from one consistent memory state."""
        with model.memory_lock:
            bos = int(model.config.add_bos_embedding)
            prefix = model.memory_prefix_length if slots is None else bos + slots.shape[1]
            static = None if max_cache_len is None else prefix + max_cache_len
            cache = self.cache(model, rows, slots, read_only, static)
        mask = extend_attention_mask(batch.attention_mask, batch.size, batch.length, prefix, batch.device)
        return cache, mask

    def clear(self) -> None:
        self.key_values.clear()


def needs_grad(model) -> bool:
    """Whether gradients can flow into the memory prefix's keys/values (bos, norms or attention weights train)."""
    bos, _ = model.memory_embeddings()
    modules = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.self_attn)]
    return (bos is not None and bos.requires_grad) or any(p.requires_grad for m in modules for p in m.parameters())
