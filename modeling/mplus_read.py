"""M+ reads: the trained retriever (per-layer query/key projectors) and the prefix every layer reads.

An M+ read is `[bos_l; retrieved_l; pool_l; tokens]` at every layer l, positions contiguous from 0. The retrieved
slots depend on the prompt's layer-l input h_l: `q = query_proj_l(input_layernorm_l(h_l))`, each candidate (the
layer's long-term slots, then its pending ones, see `mplus_memory`) scores the mean over the prompt tokens of
sigmoid(q . key), the best `read_tokens` are read oldest first. h_l depends on what layers 0..l-1 read, so
`mplus_prefix` runs the prompt through the layers once, choosing each layer's slots on the way, and returns every
layer's prefix keys/values: a cache seeded with them (`memory_prefix.seeded_cache`) then serves the stock Llama
forward and `generate` (decoding reuses what the prefill retrieved, as in the official code).

Differences from the official code, on purpose: every row of a batch retrieves for itself (its own tokens only,
padding excluded); equal scores and equal ages are ordered deterministically (`mplus_memory.top_candidates`,
`read_order`); with fewer candidates than `read_tokens` in some layer, every layer reads that many (each candidate
once) and the positions stay contiguous (the official code repeats long-term slots, ignores pending ones, and loops
forever on an empty long-term memory); scores are computed in float32 whatever the model's dtype.
"""

import dataclasses
import math

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half

from .memory_prefix import (
    PrefixKV,
    extend_attention_mask,
    positions_from_mask,
    rotate_prefix_keys,
    seeded_cache,
    slot_key_values,
)
from .mplus_memory import RECALL_FLOOR, MPlusMemory, retrieve


def projector(hidden_size: int, width: int, depth: int, act: str) -> nn.Module:
    """The official retriever projector: depth 2 is Linear(d, 2s) -> act -> Linear(2s, s), depth 1 Linear(d, s)
    (no biases)."""
    if depth == 1:
        return nn.Linear(hidden_size, width, bias=False)
    return nn.Sequential(
        nn.Linear(hidden_size, 2 * width, bias=False), ACT2FN[act], nn.Linear(2 * width, width, bias=False)
    )


class RetrieverLayer(nn.Module):
    """One layer's projectors: prompt queries and slot keys, both from the layer's normalised input."""

    def __init__(self, config):
        super().__init__()
        d, s, depth = config.hidden_size, config.retriever_size, config.retriever_depth
        self.query_proj = projector(d, s, depth, config.hidden_act)
        self.key_proj = projector(d, s, depth, config.hidden_act)


class MPlusRetriever(nn.Module):
    """The M+ retriever of every layer (`retriever.layers.{l}.query_proj` / `.key_proj`)."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(RetrieverLayer(config) for _ in range(config.num_hidden_layers))

    @torch.no_grad()
    def slot_keys(self, decoder_layers: nn.ModuleList, slots: torch.Tensor) -> torch.Tensor:
        """Keys [L, q, s] of slots [L, q, d]: `key_proj_l(input_layernorm_l(slot))` (what a dropped slot keeps)."""
        keys = []
        for layer, (decoder, retriever) in enumerate(zip(decoder_layers, self.layers, strict=True)):
            weight = next(retriever.key_proj.parameters())
            normed = decoder.input_layernorm(slots[layer].to(weight.device, weight.dtype))
            keys.append(retriever.key_proj(normed))
        return torch.stack(keys)


@dataclasses.dataclass
class MPlusRetrieval:
    """What one read retrieved, per layer l: the prompt queries [B, T, s], every candidate's score [B, C_l], the
    top candidates (ascending) [B, k], the same in read order [B, k] and their ages [B, k]."""

    queries: list[torch.Tensor]
    scores: list[torch.Tensor]
    top: list[torch.Tensor]
    order: list[torch.Tensor]
    ages: list[torch.Tensor]


def read_count(memory: MPlusMemory, read_tokens: int) -> int:
    """Slots every layer reads: `read_tokens`, or fewer when some layer has fewer candidates."""
    return min([read_tokens] + [n + memory.num_pending for n in memory.slot_counts])


@torch.no_grad()
def mplus_prefix(
    model: nn.Module,
    retriever: MPlusRetriever,
    memory: MPlusMemory,
    config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    memory_kv: PrefixKV,
    head: int,
    finish: bool = False,
) -> tuple[PrefixKV, MPlusRetrieval, DynamicCache, torch.Tensor | None]:
    """Per-layer keys/values [B, kv_heads, P, head_dim] of every row's `[bos_l; retrieved_l; pool_l]`
    (P = bos + read_count + filled pool slots, the same for all rows and layers), and what was retrieved.

    model: the `LlamaModel` (layers, rotary embedding); inputs_embeds [B, T, d] the prompt; attention_mask [B, T]
    (1 = token; left or right padding) or None; memory_kv: the keys/values of `[bos; pool]` at positions 0.. (the
    pool read's, cached by the model), `head` = 1 with a bos slot, else 0. The pool's keys are turned to the
    positions after the retrieved slots. Runs layers 0..L-2 on the prompt (layer l reading the prefix chosen for
    it), with the active adapter; `finish=True` runs the last layer too.

    Returns (prefix keys/values, what was retrieved, the cache of the layers run: prefix + prompt, the last layer's
    output [B, T, d] (before the final norm) when `finish`, else None).
    """
    layers, batch, length = model.layers, inputs_embeds.shape[0], inputs_embeds.shape[1]
    device = inputs_embeds.device
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        mask = attention_mask.bool()
    count = read_count(memory, config.read_tokens)
    P = memory_kv[0][0].shape[2] + count
    full_mask = torch.cat([torch.ones(batch, P, dtype=torch.long, device=device), mask.long()], dim=1)
    positions = positions_from_mask(full_mask, length)
    rotary = model.rotary_emb(inputs_embeds, positions)
    cache = DynamicCache()
    cache.layers.extend(DynamicLayer() for _ in layers)
    record = MPlusRetrieval([], [], [], [], [])
    prefix_kv: PrefixKV = []
    hidden, causal = inputs_embeds, None
    for index, layer in enumerate(layers):
        normed = layer.input_layernorm(hidden)
        queries = retriever.layers[index].query_proj(normed.to(_weight_dtype(retriever.layers[index])))
        scores = memory.candidate_scores(index, queries, mask)
        chosen = [retrieve(memory, index, row, count) for row in scores]
        order = torch.stack([o for _, o in chosen]) if chosen else torch.zeros(0, count, dtype=torch.long)
        record.queries.append(queries)
        record.scores.append(scores)
        record.top.append(torch.stack([t for t, _ in chosen]))
        record.order.append(order)
        record.ages.append(memory.candidate_ages(index, order.flatten()).view_as(order))
        keys_l, values_l = (t.to(device) for t in memory_kv[index])
        if count:
            rows = [slot_key_values([layer], [memory.candidate_slots(index, o).to(device, hidden.dtype)])[0]
                    for o in order]
            rows = [(torch.cat([k for k, _ in rows]), torch.cat([v for _, v in rows]))]
            retrieved_k, retrieved_v = rotate_prefix_keys(rows, model.rotary_emb, head)[0]
        else:  # nothing to retrieve yet (an emptied memory)
            retrieved_k = retrieved_v = keys_l.new_zeros(batch, keys_l.shape[1], 0, keys_l.shape[3])
        pool_k = shift_positions(keys_l[:, :, head:], model.rotary_emb, count)
        kv = (
            torch.cat([_expand(keys_l[:, :, :head], batch), retrieved_k, _expand(pool_k, batch)], 2),
            torch.cat([_expand(values_l[:, :, :head], batch), retrieved_v, _expand(values_l[:, :, head:], batch)], 2),
        )
        prefix_kv.append(kv)
        if index == len(layers) - 1 and not finish:
            return prefix_kv, record, cache, None
        cache.layers[index].lazy_initialization(*kv)
        cache.layers[index].keys, cache.layers[index].values = kv
        if causal is None:
            causal = create_causal_mask(config, hidden, full_mask, cache, position_ids=positions, layer_idx=index)
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, cache=cache, position_embeddings=rotary)
    return prefix_kv, record, cache, hidden


def _expand(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor.expand(batch, -1, -1, -1)


def shift_positions(keys: torch.Tensor, rotary_emb: nn.Module, delta: int) -> torch.Tensor:
    """Keys [B, kv, P, hd] rotated at positions p, turned to positions p + delta (one more rotation by delta: RoPE
    rotations compose), computed in float32."""
    if delta == 0:
        return keys
    if getattr(rotary_emb, "attention_scaling", 1.0) != 1.0:
        raise ValueError("M+ reads need a RoPE without attention scaling (default, linear, llama3)")
    cos, sin = rotary_emb(keys.float(), torch.tensor([[delta]], device=keys.device))
    cos, sin = cos[:, None], sin[:, None]
    return (keys.float() * cos + rotate_half(keys.float()) * sin).to(keys.dtype)


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class MPlusRead:
    """Read mode `"mplus"`: prefix `[bos; the k long-term slots each layer's retriever scores best for the row's
    prompt, oldest first; pool]`, per row (see the module docstring). Caches nothing of its own: the pool's
    keys/values come from the pool read's cache (stale when the pool or the weights change); what the last read
    retrieved is kept as `last` (`model.last_retrieval`)."""

    def __init__(self):
        self.last: MPlusRetrieval | None = None

    @staticmethod
    def check_config(config) -> None:
        size, depth = config.retriever_size, config.retriever_depth
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or depth not in (1, 2):
            raise ValueError(
                "read_mode='mplus' needs the trained M+ retriever: retriever_size >= 1 and retriever_depth 1 or 2 "
                f"(got {size!r}, {depth!r}); convert an M+ checkpoint with `memoryllm-hf convert --official`"
            )
        every = config.long_term_merge_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"long_term_merge_every must be an integer >= 1, got {every!r}")
        for name in ("recall_initial", "recall_decay"):
            value = getattr(config, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if config.recall_initial <= RECALL_FLOOR:
            raise ValueError(f"recall_initial must exceed {RECALL_FLOOR} (slots would leave at their first merge)")

    @staticmethod
    def from_base_defaults(memory_config: dict, base_config) -> None:
        raise ValueError(
            "read_mode='mplus' needs a trained M+ retriever, which a base model does not have: convert an M+ "
            "checkpoint (`memoryllm-hf convert --official`), or use read_mode='retrieve' (training-free)"
        )

    def has_memory(self, model) -> bool:
        memory = model.long_term_memory
        return model.memory_is_initialized or any(memory.slot_counts) or memory.num_pending > 0

    def longest_prefix(self, model, slots=None) -> int:
        """Positions the prefix of the next read may take at most: `[bos; k retrieved; pool]` (k: `read_tokens`, or
        fewer when the long-term memory holds fewer candidates per layer)."""
        memory, cfg = model.long_term_memory, model.config
        candidates = max(memory.slot_counts, default=0) + memory.num_pending
        return int(cfg.add_bos_embedding) + min(cfg.read_tokens, candidates) + model.num_filled_slots

    def read(self, model, batch, rows: int, slots=None, read_only=False, max_cache_len=None):
        """(cache seeded with every row's M+ prefix for `rows` cache rows, attention mask [B, prefix + tokens]) of one
        prompt batch (`ReadBatch`): the retrieval pass, then the stock forward reads the cache."""
        if batch.attention_mask is not None and batch.attention_mask.shape[-1] != batch.length:
            raise ValueError(
                f"with read_mode='mplus' the attention_mask covers the tokens only: expected [batch, {batch.length}], "
                f"got {tuple(batch.attention_mask.shape)}"
            )
        prefix_kv, self.last = model.mplus_retrieval(batch.input_ids, batch.attention_mask, batch.inputs_embeds)
        if rows != batch.size:
            prefix_kv = [(k.repeat_interleave(rows // batch.size, 0), v.repeat_interleave(rows // batch.size, 0))
                         for k, v in prefix_kv]
        length = prefix_kv[0][0].shape[2]
        static = None if max_cache_len is None else length + max_cache_len
        cache = seeded_cache(model.config, prefix_kv, rows, read_only, static)
        return cache, extend_attention_mask(batch.attention_mask, batch.size, batch.length, length, batch.device)

    def clear(self) -> None:
        """Nothing of its own to forget."""
