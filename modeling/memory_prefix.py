"""Memory as an attention prefix: per-layer keys/values of `[bos_l; slots_l]`, seeded into a generation cache.

Attending to a prefix whose keys/values were computed from hidden states is exactly what concatenating those
hidden states to every layer input does (the official implementation), without recomputing them per forward.
"""

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache
from transformers.models.llama.modeling_llama import rotate_half

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]
# A cache seeded with a memory prefix records its length here, so a later call continuing from it (`forward` or
# `generate` with `cache=`) knows which positions are memory and which are tokens.
PREFIX_LENGTH_ATTRIBUTE = "memory_prefix_length"
# ... and, when rows read prefixes of different lengths (retrieval reads, left-padded), which of its columns each
# row reads ([rows, prefix], 1 = memory, 0 = padding).
PREFIX_MASK_ATTRIBUTE = "memory_prefix_mask"


def prefix_key_values(
    layers: nn.ModuleList, rotary_emb: nn.Module, prefix: list[torch.Tensor], start: int = 0
) -> PrefixKV:
    """Keys/values [1, kv_heads, P, head_dim] of each layer's prefix hidden states [P, d], at positions start.. ,
    computed on the layer's own device (`device_map` may spread layers over devices, or offload them).
    Made contiguous once here, so the cache's concatenation at every prefill is a plain copy."""
    return rotate_prefix_keys(slot_key_values(layers, prefix), rotary_emb, start)


def slot_key_values(layers: nn.ModuleList, prefix: list[torch.Tensor]) -> PrefixKV:
    """Keys (not yet rotated) and values [1, kv_heads, P, head_dim] of each layer's hidden states [P, d]: what a
    slot contributes wherever it is read (its position only rotates the keys)."""
    out = []
    for layer, hidden in zip(layers, prefix, strict=True):
        attn, device = layer.self_attn, execution_device(layer)
        normed = layer.input_layernorm(hidden[None].to(device))
        shape = (1, hidden.shape[0], -1, attn.head_dim)
        out.append((attn.k_proj(normed).view(shape).transpose(1, 2), attn.v_proj(normed).view(shape).transpose(1, 2)))
    return out


def rotate_prefix_keys(kv: PrefixKV, rotary_emb: nn.Module, start: int = 0) -> PrefixKV:
    """`kv` with the keys rotated to positions start, start + 1, ... (contiguous tensors, each on its layer's
    device)."""
    keys = kv[0][0]
    positions = torch.arange(start, start + keys.shape[2], device=keys.device)[None]
    cos, sin = rotary_emb(keys, positions)
    cos, sin = cos[:, None].to(keys.dtype), sin[:, None].to(keys.dtype)
    out = []
    for k, v in kv:
        if k.device != cos.device:
            cos, sin = cos.to(k.device), sin.to(k.device)
        out.append(((k * cos + rotate_half(k) * sin).contiguous(), v.contiguous()))
    return out


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the device accelerate's hook gives it under a `device_map` (its weights may be
    offloaded), otherwise the device of its weights."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in (hook, *getattr(hook, "hooks", ())):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return next(module.parameters()).device


class ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer holding only the memory prefix: `update` returns prefix + new keys without storing them, so a
    gradient-checkpointing replay of the layer sees exactly what the first pass saw."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def seeded_cache(
    config,
    prefix_kv: PrefixKV,
    batch_size: int,
    read_only: bool = False,
    max_cache_len: int | None = None,
    prefix_mask: torch.Tensor | None = None,
) -> Cache:
    """A fresh cache that starts with the prefix (shared, never copied until the cache grows). `read_only` makes
    a cache that never grows (training with gradient checkpointing); `max_cache_len` a `StaticCache` of that many
    positions (prefix included) holding a copy of the prefix (`cache_implementation="static"`, `torch.compile`).

    Every question builds one, so the common case skips `DynamicCache(config=...)`, whose inspection of the config
    costs about a millisecond: when all layers use full attention it builds the same `DynamicLayer`s directly.
    `prefix_mask` [batch_size, P] records which prefix columns each row reads (rows' prefixes of different lengths).
    """
    if max_cache_len is not None:
        cache = StaticCache(config=config, max_cache_len=max_cache_len)
        for layer, (keys, values) in zip(cache.layers, prefix_kv, strict=True):
            layer.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1))
        return record_prefix(cache, prefix_kv, prefix_mask)
    if read_only:
        cache = Cache(layers=[ReadOnlyPrefixLayer() for _ in prefix_kv])
    elif _full_attention_only(config):
        cache = DynamicCache()
        cache.layers.extend(DynamicLayer() for _ in prefix_kv)
    else:
        cache = DynamicCache(config=config)
    for layer, (keys, values) in zip(cache.layers, prefix_kv, strict=True):
        layer.lazy_initialization(keys, values)
        if keys.shape[0] != batch_size:
            keys, values = keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1)
        layer.keys, layer.values = keys, values
    return record_prefix(cache, prefix_kv, prefix_mask)


def record_prefix(cache: Cache, prefix_kv: PrefixKV, prefix_mask: torch.Tensor | None = None) -> Cache:
    """Mark `cache` as starting with the memory prefix `prefix_kv` (and, if not all ones, each row's `prefix_mask`)."""
    setattr(cache, PREFIX_LENGTH_ATTRIBUTE, prefix_kv[0][0].shape[-2])
    if prefix_mask is not None and not bool(prefix_mask.all()):
        setattr(cache, PREFIX_MASK_ATTRIBUTE, prefix_mask)
        reorder = cache.reorder_cache

        def reorder_cache(beam_idx: torch.LongTensor) -> None:  # the rows' prefix masks follow their rows
            reorder(beam_idx)
            mask = getattr(cache, PREFIX_MASK_ATTRIBUTE)
            setattr(cache, PREFIX_MASK_ATTRIBUTE, mask[beam_idx.to(mask.device)])

        cache.reorder_cache = reorder_cache
    return cache


def cache_prefix_mask(cache, rows: int) -> torch.Tensor | None:
    """Which prefix columns each of `rows` rows reads (None: all of them)."""
    mask = getattr(cache, PREFIX_MASK_ATTRIBUTE, None) if cache is not None else None
    if mask is not None and mask.shape[0] != rows:
        raise ValueError(
            f"the cache was made for {mask.shape[0]} rows whose memory prefixes differ; continue it with {mask.shape[0]}"
            f" rows, not {rows}"
        )
    return mask


def is_fresh_cache(cache) -> bool:
    """Whether a forward over `cache` starts a new read: no cache, or an empty one no read has seeded (a read that
    chose nothing seeds an empty prefix, which the forward continues instead of reading again)."""
    return cache is None or (cache.get_seq_length() == 0 and not hasattr(cache, PREFIX_LENGTH_ATTRIBUTE))


def cache_prefix_length(cache) -> int:
    """Memory positions at the start of `cache` (0 for a cache not made by `seeded_cache`, or None)."""
    return getattr(cache, PREFIX_LENGTH_ATTRIBUTE, 0) if cache is not None else 0


def _full_attention_only(config) -> bool:
    """True when `DynamicCache(config=config)` would make every layer a plain `DynamicLayer` (Llama)."""
    fields = ("layer_types", "sliding_window", "attention_chunk_size")
    return all(getattr(config, name, None) is None for name in fields)


def extend_attention_mask(
    attention_mask: torch.Tensor | None,
    batch_size: int,
    length: int,
    prefix_length: int,
    device: torch.device,
    prefix_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The user's mask over the tokens [B, T] (or already over prefix + tokens) -> mask over prefix + tokens.
    `prefix_mask` [B, P]: the prefix columns each row reads (default: all)."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("MemoryLlama takes a 2-D attention_mask [batch, tokens]")
    if attention_mask is not None and attention_mask.shape[1] == prefix_length + length:
        return attention_mask
    if attention_mask is not None and attention_mask.shape[1] != length:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns; expected {length} (the tokens) or "
            f"{prefix_length + length} (memory prefix + tokens)"
        )
    if attention_mask is None:
        attention_mask = torch.ones(batch_size, length, dtype=torch.long, device=device)
    if prefix_mask is None:
        prefix_mask = torch.ones(batch_size, prefix_length, dtype=attention_mask.dtype, device=attention_mask.device)
    prefix_mask = prefix_mask.to(device=attention_mask.device, dtype=attention_mask.dtype)
    return torch.cat([prefix_mask, attention_mask], dim=1)


def continued_read(cache, attention_mask: torch.Tensor, position_ids, length: int, device) -> tuple:
    """(attention mask, position ids) of a forward continuing from `cache` with `length` new tokens: the user's mask
    covers the tokens so far (or the memory prefix and them); positions follow it, so right-padded rows continue
    where their own tokens ended."""
    batch = attention_mask.shape[0]
    prefix = cache_prefix_length(cache)
    seen = int(cache.get_seq_length()) - prefix + length
    if prefix:
        rows_prefix = cache_prefix_mask(cache, batch)
        attention_mask = extend_attention_mask(attention_mask, batch, seen, prefix, device, rows_prefix)
    if position_ids is None and attention_mask.shape[1] == prefix + seen:
        position_ids = positions_from_mask(attention_mask, length)
    return attention_mask, position_ids


def positions_from_mask(full_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Position ids of the last `length` tokens: prefix slots take 0..P-1, real tokens continue after them
    (left padding is skipped, so each row matches its unpadded run)."""
    return (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]


def module_fingerprint(module: nn.Module, parts: list) -> None:
    """Append the identity, adapter settings and parameter versions of `module` and its submodules. Runs at every
    question, so it walks `_modules`/`_parameters` directly (`modules()`/`parameters()` cost ~7x more)."""
    parts.append(id(module))
    if "active_adapter" in module.__dict__ or hasattr(type(module), "active_adapter"):
        parts += [
            str(module.active_adapter),
            getattr(module, "merged", None),
            getattr(module, "disable_adapters", None),
        ]
    for param in module._parameters.values():
        if param is not None:
            parts += [param.data_ptr(), param._version]
    for child in module._modules.values():
        if child is not None:
            module_fingerprint(child, parts)


def key_value_weights_fingerprint(layers: nn.ModuleList, bos: torch.Tensor | None) -> tuple:
    """What a slot's keys/values depend on besides the slot: the `bos` vectors, each layer's input norm and k/v
    projections (with adapters). Equal fingerprints: keys/values computed earlier are still right."""
    parts: list = []
    if bos is not None:
        parts += [bos.data_ptr(), bos._version]
    for layer in layers._modules.values():
        attention = layer._modules["self_attn"]._modules
        for module in (layer._modules["input_layernorm"], attention["k_proj"], attention["v_proj"]):
            module_fingerprint(module, parts)
    return tuple(parts)
