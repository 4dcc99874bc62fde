"""Shared-prefix batched reads: rows of a batch that read the same memory hold its keys/values once.

The stock path seeds a `DynamicLayer` with the memory prefix expanded to the batch; its first `update` concatenates,
so every row gets its own copy of the P prefix positions, re-copied at every decode step. Here a cache layer keeps the
prefix once (`[1, kv_heads, P, head_dim]`) next to each row's own keys/values, and an attention function registered
with transformers' `AttentionInterface` attends to the two parts separately and combines them exactly:

    out = exp(lse_prefix - lse) * out_prefix + exp(lse_rows - lse) * out_rows,   lse = logaddexp(lse_prefix, lse_rows)

where each part's output is its own softmax-weighted sum and `lse_*` the log-sum-exp of its scaled scores. The
prefix part runs as one matmul per kv head for the queries of all rows (no per-row copy, no GQA repeat).

Activation is scoped to one forward: `shared_prefix_reads` switches the model's `_attn_implementation` from "sdpa"
to this function (which is sdpa itself whenever the cache is not a `SharedPrefixCache`) and back.

Why per forward, and not once at load time: outside a forward `config._attn_implementation` must keep showing what
the user chose. Transformers reads it there: `save_pretrained` and `push_to_hub` write the config, and this name
(one per copy of this module, see `ATTENTION_NAME`) would be wrong in a checkpoint loaded elsewhere;
`set_attn_implementation`, `generate`'s compile and cache checks and PEFT inspect it; a user who picks "eager" or a
flash kernel must get exactly that. So only a forward over a shared cache, on an "sdpa" model, runs with the switch
(reentrant and thread-safe, see `_attention_switched`).
"""

import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# One name per copy of this module: a checkpoint's remote code and the installed package may both be loaded, and each
# function must see the cache class of its own copy.
ATTENTION_NAME = f"memory_shared_prefix[{__name__}]"
# The attention implementation the shared path replaces (its masks and its fallback).
BASE_ATTENTION = "sdpa"
CACHE_KWARG = "shared_prefix_cache"
# Most score elements one explicit prefix-attention block may hold (64 Mi: 256 MB in float32).
SCORES_BUDGET = 64 * 2**20


class SharedPrefixLayer(DynamicLayer):
    """A cache layer holding a prefix shared by every row (`prefix_keys/values`, batch dimension 1) and the rows' own
    keys/values (`keys/values`, [B, kv, T, d]). `update` stores and returns only the rows' own keys/values: attention
    reads the prefix from the layer (see `shared_prefix_attention`)."""

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor):
        super().__init__()
        if prefix_keys.shape[0] != 1 or prefix_values.shape[0] != 1:
            raise ValueError(f"a shared prefix has batch dimension 1, got keys of shape {tuple(prefix_keys.shape)}")
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.device, self.is_initialized = prefix_keys.device, True

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[-2]

    @property
    def own_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.prefix_length + self.own_length

    def reset(self) -> None:
        self.keys = self.values = None

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` of the rows' own positions (the shared prefix is never cropped)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove < 0 and -tokens_to_remove > self.own_length:
            raise ValueError(f"cannot crop {-tokens_to_remove} positions: the rows hold {self.own_length} of their own")
        if tokens_to_remove < 0:
            self.keys, self.values = self.keys[..., :tokens_to_remove, :], self.values[..., :tokens_to_remove, :]

    def _rows(self, select) -> None:
        if self.keys is not None:
            self.keys, self.values = select(self.keys), select(self.values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def offload(self):
        self._rows(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._rows(lambda t: t.to(self.device, non_blocking=True))


class SharedPrefixCache(DynamicCache):
    """A generation cache whose layers hold one shared prefix per layer (see `SharedPrefixLayer`); the rows' own
    positions grow as in a `DynamicCache`. `prefix_visible` is set per forward by `shared_prefix_reads`."""

    def __init__(self, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.layers.extend(SharedPrefixLayer(keys, values) for keys, values in prefix_kv)
        self.prefix_visible = True


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Attention over `[shared prefix; row's own keys]`, exact, without materialising the prefix per row.

    `key`/`value` [B, kv, T, d] are the rows' own; the prefix comes from the `SharedPrefixCache` passed as
    `shared_prefix_cache`. `attention_mask` is sdpa's (boolean [B, 1, q, P + T], True = attend, or None when every
    key is visible causally). Without a shared cache this is sdpa; with dropout, or a mask that hides prefix columns,
    it attends to the concatenation through sdpa (the standard path).
    """
    cache = kwargs.get(CACHE_KWARG)
    if not isinstance(cache, SharedPrefixCache):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = cache.layers[module.layer_idx]
    prefix_keys, prefix_values = layer.prefix_keys, layer.prefix_values
    batch, heads, length, dim = query.shape
    if (dropout > 0 and module.training) or not cache.prefix_visible:
        keys = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], dim=-2)
        values = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], dim=-2)
        return sdpa_attention_forward(
            module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scale = dim**-0.5 if scaling is None else scaling
    kv_heads, prefix_length = key.shape[1], prefix_keys.shape[-2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups, length, dim)  # query head h reads kv head h // groups
    # Prefix: every row's queries as one sequence per kv head, against the one copy of the prefix.
    stacked = grouped.transpose(0, 1).reshape(1, kv_heads, batch * groups * length, dim)
    out_prefix, lse_prefix = _attend_prefix(stacked, prefix_keys, prefix_values, scale)
    out_prefix = out_prefix.view(kv_heads, batch, groups, length, dim).transpose(0, 1)
    lse_prefix = lse_prefix.view(kv_heads, batch, groups, length, 1).transpose(0, 1)
    # The rows' own keys, under the mask's own columns (or causal, aligned to the last query).
    own_mask = _own_mask(attention_mask, prefix_length, length, key.shape[-2], query.device)
    own_queries = grouped.reshape(batch, kv_heads, groups * length, dim).float()
    out_rows, lse_rows = _attend(own_queries, key.float(), value.float(), scale, own_mask, groups)
    out_rows = out_rows.view(batch, kv_heads, groups, length, dim)
    lse_rows = lse_rows.view(batch, kv_heads, groups, length, 1)
    lse = torch.logaddexp(lse_prefix, lse_rows)
    out = out_prefix * torch.exp(lse_prefix - lse) + out_rows * torch.exp(lse_rows - lse)
    out = out.reshape(batch, heads, length, dim).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _attend_prefix(query, keys, values, scale: float):
    """`_attend` without a mask; on the CPU through torch's fused flash kernel (which returns the log-sum-exp too,
    about 5x faster than the matmul-softmax-matmul at P = 4,097) unless a gradient is needed (the kernel's backward
    ignores the gradient of its log-sum-exp)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, values))
    if query.device.type == "cpu" and not needs_grad:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, False, scale=scale
        )[:2]
        return out.float(), lse.float()[..., None]
    # Elsewhere (other devices, or with gradient): explicit scores, in blocks of queries so that one block's scores
    # stay within SCORES_BUDGET elements (all rows' queries against the whole prefix would not fit for long prompts).
    keys, values = keys.float(), values.float()
    block = max(1, SCORES_BUDGET // (query.shape[1] * keys.shape[-2]))
    parts = [_attend(chunk.float(), keys, values, scale, None) for chunk in query.split(block, dim=-2)]
    return torch.cat([out for out, _ in parts], dim=-2), torch.cat([lse for _, lse in parts], dim=-2)


def _attend(query, keys, values, scale: float, mask: torch.Tensor | None, groups: int = 1):
    """Softmax attention of query [b, kv, m, d] over keys/values [b', kv, n, d] (b' broadcasts), returning the output
    [b, kv, m, d] and the log-sum-exp of the scaled scores [b, kv, m, 1] (-inf, output 0, where nothing is visible).
    `mask` [b, 1, m / groups, n] (True = visible) applies to each of the `groups` query blocks of m."""
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if mask is not None:
        shape = scores.shape
        scores = scores.view(shape[0], shape[1], groups, -1, shape[-1]).masked_fill(~mask[:, :, None], -torch.inf)
        scores = scores.view(shape)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0))
    return torch.matmul(weights, values), lse


def _own_mask(
    attention_mask: torch.Tensor | None, prefix_length: int, queries: int, keys: int, device: torch.device
) -> torch.Tensor | None:
    """Visibility [B or 1, 1, q, T] of the rows' own keys: the mask's columns after the prefix, or (mask None) causal
    with the queries at the end; None when every own key is visible."""
    if attention_mask is not None:
        own = attention_mask[..., prefix_length:]
        return own if own.dtype == torch.bool else own == 0
    if queries == 1:
        return None
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(keys - queries)[None, None]


@contextmanager
def shared_prefix_reads(config, cache, attention_mask: torch.Tensor | None, kwargs: dict):
    """Scope of one forward over `cache`: with a `SharedPrefixCache`, attention runs through
    `shared_prefix_attention` (the cache travels in `kwargs`); with any other cache nothing changes."""
    if not isinstance(cache, SharedPrefixCache):
        yield
        return
    prefix_length = cache.layers[0].prefix_length
    cache.prefix_visible = attention_mask is None or (
        attention_mask.dim() == 2 and bool(attention_mask[:, :prefix_length].all())
    )
    kwargs[CACHE_KWARG] = cache
    with _attention_switched(config):
        yield


_SWITCH_LOCK = threading.Lock()
_SWITCHED: dict[int, list] = {}  # id(config) -> [forwards inside, implementation before]


@contextmanager
def _attention_switched(config):
    """Set `config._attn_implementation` to the shared-prefix function while any forward over a shared cache runs
    (reentrant and thread-safe: the first entrant switches, the last one restores). A concurrent forward without a
    shared cache meanwhile runs sdpa through the same function."""
    with _SWITCH_LOCK:
        entry = _SWITCHED.get(id(config))
        if entry is None:
            entry = _SWITCHED[id(config)] = [0, config._attn_implementation]
            config._attn_implementation = ATTENTION_NAME
        entry[0] += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                config._attn_implementation = entry[1]
                del _SWITCHED[id(config)]


def shares_prefix(config, batch_size: int) -> bool:
    """Whether a batch of `batch_size` rows reading one prefix gains from a shared cache under this config."""
    return batch_size > 1 and config._attn_implementation in (BASE_ATTENTION, ATTENTION_NAME)


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
