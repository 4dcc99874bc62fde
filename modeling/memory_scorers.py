"""Retrieval scorers: one class per way of scoring stored blocks against a prompt (lexical match, attention keys).

Only the model's own weights are used (no extra network, no stored text):

- lexical: the layer-0 slots of the "input" rule are the token embeddings of the injected text. A question token
  matches a block when the block holds a near-identical layer-0 vector (cosine >= `LEXICAL_MATCH`), weighted by an
  IDF computed from how many stored blocks hold one (BM25's IDF). Chat-template tokens and stop words are in every
  block or in none, so they count little or nothing, whatever the prompt style.
- keys: InfLLM-style attention mass at a few calibrated layers: the question's queries q_proj(input_layernorm(h))
  against the block's un-rotated keys k_proj(input_layernorm(slot)); the queries of a kv group's heads are averaged
  (GQA: one query per kv group, 192 dims for SmolLM2), each question token attends (softmax) over all stored slots
  at once, and a block's score is the attention mass its slots get, averaged over the question tokens. (The best
  slot per block instead of the mass favours long blocks: template tokens then pick the longest ones.)

A scorer has three jobs: `index(layers, slots, key_layers)`: its feature (named `feature`) of one stored block
[L, k, d], with the slots along axis `slot_axis` (stored in `memory_retrieval.FEATURE_DTYPE`);
`question(layers, hidden_states, key_layers)`: its feature (named `query`) of a prompt batch; `score(query_row,
valid, packed, segment, count)`: one prompt row against all stored blocks, packed. The table of scorers and their
fusion is `memory_retrieval.SCORERS`.
"""

import math
from collections.abc import Sequence

import torch

# Cosine at which two layer-0 vectors count as the same token (identical tokens give 1 up to float16 rounding).
LEXICAL_MATCH: float = 0.95


def project(layer, states: torch.Tensor, proj: str) -> torch.Tensor:
    """q_proj or k_proj of the layer's input_layernorm, without rotary position (computed in float32)."""
    attention = layer.self_attn
    weight = getattr(attention, proj)
    normed = layer.input_layernorm(states.to(layer.input_layernorm.weight.dtype))
    return weight(normed).float()


def segment_max(scores: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """[..., N] scores of stored slots -> [..., count]: the best slot of each block (`segment` [N]: block ids)."""
    out = scores.new_full((*scores.shape[:-1], count), -torch.inf)
    return out.scatter_reduce(-1, segment.expand_as(scores), scores, "amax")


def lexical_scores(tokens: torch.Tensor, stored: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """IDF-weighted share of the question's distinct tokens [T, d] found (near-identical layer-0 vector) in each
    block. Each distinct token counts once: a chat template repeats its newlines and markers, and counted every
    time they outweighed the question's own words."""
    same = (tokens @ tokens.T) >= LEXICAL_MATCH
    first = ~same.tril(-1).any(1)
    best = segment_max(tokens[first] @ stored.T, segment, count)  # [distinct tokens, blocks]
    found = best >= LEXICAL_MATCH
    holding = found.sum(1, dtype=torch.float32)
    idf = torch.log1p((count - holding + 0.5) / (holding + 0.5))
    return (idf[:, None] * found).sum(0) / idf.sum().clamp(min=1e-6)


def key_scores(queries: torch.Tensor, keys: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """Attention mass per block: each question token's mean query of a kv group attends (softmax) over all stored
    slots at once; a block's score is the mass its slots get, averaged over question tokens and summed over kv
    groups and key layers. queries [layers, T, kv, hd] (pre-scaled), keys [layers, N, kv, hd]."""
    total = queries.new_zeros(count)
    for q, k in zip(queries, keys, strict=True):
        weights = torch.softmax(torch.einsum("tgd,ngd->gtn", q, k), dim=-1)  # [kv, T, N]
        mass = weights.new_zeros(*weights.shape[:-1], count).index_add_(-1, segment, weights)
        total = total + mass.mean(1).sum(0)
    return total


class LexicalScorer:
    """Layer-0 token match with BM25's IDF (see the module docstring). Block feature "tokens" [k, d]: the
    unit-normalised layer-0 slots; question feature "tokens" [B, T, d]: the unit-normalised token embeddings."""

    feature, query, slot_axis = "tokens", "tokens", 0

    def index(self, layers, slots: torch.Tensor, key_layers: Sequence[int]) -> torch.Tensor:
        return torch.nn.functional.normalize(slots[0].float(), dim=-1)

    def question(self, layers, hidden_states, key_layers: Sequence[int]) -> torch.Tensor:
        return torch.nn.functional.normalize(hidden_states[0].float(), dim=-1)

    def score(self, query: torch.Tensor, valid: torch.Tensor, stored: torch.Tensor, segment, count: int):
        return lexical_scores(query[valid], stored, segment, count)


class KeyScorer:
    """Attention mass at the key layers (see the module docstring). Block feature "keys" [len(key_layers), k,
    kv_heads, head_dim]: un-rotated keys; question feature "queries" [B, len(key_layers), T, kv_heads, head_dim]:
    un-rotated queries averaged over each kv group's heads, divided by sqrt(head_dim)."""

    feature, query, slot_axis = "keys", "queries", 1

    def index(self, layers, slots: torch.Tensor, key_layers: Sequence[int]) -> torch.Tensor:
        keys = [project(layers[layer], slots[layer], "k_proj") for layer in key_layers]
        head_dim = layers[0].self_attn.head_dim
        keys = torch.stack(keys).unflatten(-1, (-1, head_dim)) if keys else slots.new_zeros(0, slots.shape[1], 1, 0)
        return keys

    def question(self, layers, hidden_states, key_layers: Sequence[int]) -> torch.Tensor:
        batch, length = hidden_states[0].shape[:2]
        queries = []
        for layer in key_layers:
            states = hidden_states[layer]
            if states is None:
                raise ValueError(f"hidden_states[{layer}] is needed (a retrieval layer) but is None")
            attention = layers[layer].self_attn
            groups, head_dim = attention.num_key_value_groups, attention.head_dim
            q = project(layers[layer], states, "q_proj").view(batch, length, -1, groups, head_dim)
            queries.append(q.mean(3) / math.sqrt(head_dim))
        return (torch.stack(queries, 1) if queries else hidden_states[0].new_zeros(batch, 0, length, 1, 0)).float()

    def score(self, query: torch.Tensor, valid: torch.Tensor, stored: torch.Tensor, segment, count: int):
        return key_scores(query[:, valid], stored, segment, count)
