"""Retrieval scorers: how well each stored injection (a block of slots) matches a prompt batch; `SCORERS` is the table.

Every injection (one memory update) is a block of slots [L, k, d]. At write time `block_features` keeps two small
views of it; at read time `question_features` takes the same views of the prompt's layer inputs (a memory-less
forward) and `score_blocks` ranks the stored blocks. Only the model's own weights are used (no extra network, no
stored text):

- lexical: the layer-0 slots of the "input" rule are the token embeddings of the injected text. A question token
  matches a block when the block holds a near-identical layer-0 vector (cosine >= `LEXICAL_MATCH`), weighted by an
  IDF computed from how many stored blocks hold one (BM25's IDF). Chat-template tokens and stop words are in every
  block or in none, so they count little or nothing, whatever the prompt style.
- keys: InfLLM-style attention mass at a few calibrated layers: the question's queries q_proj(input_layernorm(h))
  against the block's un-rotated keys k_proj(input_layernorm(slot)); the queries of a kv group's heads are averaged
  (GQA: one query per kv group, 192 dims for SmolLM2), each question token attends (softmax) over all stored slots
  at once, and a block's score is the attention mass its slots get, averaged over the question tokens. (The best
  slot per block instead of the mass favours long blocks: template tokens then pick the longest ones.)

The scores are z-scored over the stored blocks (per question) and added with the weights of
`config.retrieval_weights` (default `SCORE_WEIGHTS`); `config.retrieval_threshold` on that fused score tells "this
question's injection is stored" from "nothing relevant is".

A scorer is one object in `SCORERS` with three jobs: `index` (its feature of one stored block, computed once per
block and weights), `question` (its feature of a prompt batch) and `score` (one prompt row against all stored
blocks). A new scorer is one class plus one line in `SCORERS`; its weight is a key of `config.retrieval_weights`.
"""

import math
from collections.abc import Sequence

import torch

# Calibrated on SmolLM2-135M-Instruct ("input" rule) with the dev sets only (shared/data SQuAD and NQ, ~300 stored
# injections; key layers 4-24 and weights 0.25-1 compared): layer 18's attention mass, added at half weight, helps
# both sets. These are the defaults of `config.retrieval_key_layers` / `config.retrieval_weights` (None = these). For
# another model, recalibrate on its own dev questions: run benchmarks/retrieval_recall.py (its JSON gives recall per
# variant and the best block's score for questions whose passage is / is not stored), then set the config fields
# (and `retrieval_threshold` between the two scores). The threshold is on z-scores over the stored blocks, so it
# assumes a store of ~100 blocks or more (with a handful, z-scores say little).
KEY_LAYERS: tuple[int, ...] = (18,)
SCORE_WEIGHTS: dict[str, float] = {"lexical": 1.0, "keys": 0.5}


def retrieval_key_layers(num_layers: int, configured: Sequence[int] | None = None) -> tuple[int, ...]:
    """The layers whose keys the "keys" scorer reads: `configured` (`config.retrieval_key_layers`) when given, else
    `KEY_LAYERS` where the model has them, else the same relative depth (a model of another depth: calibrate)."""
    if configured is not None:
        return tuple(configured)
    if all(layer < num_layers for layer in KEY_LAYERS):
        return KEY_LAYERS
    return tuple(sorted({min(num_layers - 1, round(layer / 30 * num_layers)) for layer in KEY_LAYERS}))


# Cosine at which two layer-0 vectors count as the same token (identical tokens give 1 up to float16 rounding).
LEXICAL_MATCH: float = 0.95
FEATURE_DTYPE = torch.float16


def _project(layer, states: torch.Tensor, proj: str) -> torch.Tensor:
    """q_proj or k_proj of the layer's input_layernorm, without rotary position (computed in float32)."""
    attention = layer.self_attn
    weight = getattr(attention, proj)
    normed = layer.input_layernorm(states.to(layer.input_layernorm.weight.dtype))
    return weight(normed).float()


def _segment_max(scores: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """[..., N] scores of stored slots -> [..., count]: the best slot of each block (`segment` [N]: block ids)."""
    out = scores.new_full((*scores.shape[:-1], count), -torch.inf)
    return out.scatter_reduce(-1, segment.expand_as(scores), scores, "amax")


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std().clamp(min=1e-6)


def lexical_scores(tokens: torch.Tensor, stored: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """IDF-weighted share of the question's distinct tokens [T, d] found (near-identical layer-0 vector) in each
    block. Each distinct token counts once: a chat template repeats its newlines and markers, and counted every
    time they outweighed the question's own words."""
    same = (tokens @ tokens.T) >= LEXICAL_MATCH
    first = ~same.tril(-1).any(1)
    best = _segment_max(tokens[first] @ stored.T, segment, count)  # [distinct tokens, blocks]
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
        return torch.nn.functional.normalize(slots[0].float(), dim=-1).to(FEATURE_DTYPE)

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
        keys = [_project(layers[layer], slots[layer], "k_proj") for layer in key_layers]
        head_dim = layers[0].self_attn.head_dim
        keys = torch.stack(keys).unflatten(-1, (-1, head_dim)) if keys else slots.new_zeros(0, slots.shape[1], 1, 0)
        return keys.to(FEATURE_DTYPE)

    def question(self, layers, hidden_states, key_layers: Sequence[int]) -> torch.Tensor:
        batch, length = hidden_states[0].shape[:2]
        queries = []
        for layer in key_layers:
            states = hidden_states[layer]
            if states is None:
                raise ValueError(f"hidden_states[{layer}] is needed (a retrieval layer) but is None")
            attention = layers[layer].self_attn
            groups, head_dim = attention.num_key_value_groups, attention.head_dim
            q = _project(layers[layer], states, "q_proj").view(batch, length, -1, groups, head_dim)
            queries.append(q.mean(3) / math.sqrt(head_dim))
        return (torch.stack(queries, 1) if queries else hidden_states[0].new_zeros(batch, 0, length, 1, 0)).float()

    def score(self, query: torch.Tensor, valid: torch.Tensor, stored: torch.Tensor, segment, count: int):
        return key_scores(query[:, valid], stored, segment, count)


# The retrieval scorers by name (the names are the keys of `config.retrieval_weights`), in the order their z-scores
# are added.
SCORERS = {
    "lexical": LexicalScorer(),
    "keys": KeyScorer(),
}


def block_features(
    layers: Sequence[torch.nn.Module], slots: torch.Tensor, key_layers: Sequence[int] = KEY_LAYERS
) -> dict[str, torch.Tensor]:
    """Every scorer's feature of one stored block (its slots [L, k, d]; `layers`: the decoder layers,
    `model.model.layers`), by feature name (float16): "tokens" [k, d] and "keys" [len(key_layers), k, kv_heads,
    head_dim]. For SmolLM2 that is (576 + 192 * len(key_layers)) * 2 bytes per stored token."""
    if slots.dim() != 3 or slots.shape[0] != len(layers):
        raise ValueError(f"slots must be [num_layers={len(layers)}, k, hidden], got {tuple(slots.shape)}")
    with torch.no_grad():
        return {scorer.feature: scorer.index(layers, slots, key_layers) for scorer in SCORERS.values()}


def question_features(
    layers: Sequence[torch.nn.Module],
    hidden_states: Sequence[torch.Tensor | None],
    attention_mask: torch.Tensor | None,
    key_layers: Sequence[int] = KEY_LAYERS,
) -> dict[str, torch.Tensor]:
    """Every scorer's feature of a batch of prompts, from their layer inputs: `hidden_states[l]` [B, T, d] is the
    input of layer l (as in `output_hidden_states=True`; only layer 0 and `key_layers` are read, others may be None)
    and `attention_mask` [B, T] (1 = token, 0 = padding, left or right; None = all tokens).

    Returns "tokens" [B, T, d], "queries" [B, len(key_layers), T, kv_heads, head_dim] and "mask" [B, T] (bool).
    """
    first = hidden_states[0]
    if first is None or first.dim() != 3:
        raise ValueError("hidden_states[0] must be the [B, T, d] layer-0 input (the token embeddings)")
    batch, length = first.shape[:2]
    if attention_mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool, device=first.device)
    elif attention_mask.shape != (batch, length):
        raise ValueError(f"attention_mask must be [B, T] = {(batch, length)}, got {tuple(attention_mask.shape)}")
    else:
        mask = attention_mask.bool()
    with torch.no_grad():
        features = {scorer.query: scorer.question(layers, hidden_states, key_layers) for scorer in SCORERS.values()}
    return {**features, "mask": mask}


def pack_blocks(block_feats: Sequence[dict[str, torch.Tensor]], device: torch.device | str) -> dict:
    """All blocks' features in one place for scoring ("segment": the block of every stored slot; each scorer's
    feature concatenated along its slot axis, float32 on `device`). A store that did not change can be scored many
    times against the same packing (the model keeps it until the store or the weights change)."""
    packed = {"count": len(block_feats)}
    if not block_feats:
        return {**packed, "segment": torch.zeros(0, device=device)}
    first = next(iter(SCORERS.values()))
    sizes = [b[first.feature].shape[first.slot_axis] for b in block_feats]
    packed["segment"] = torch.cat([torch.full((size,), i, device=device) for i, size in enumerate(sizes)])
    for scorer in SCORERS.values():
        features = [b[scorer.feature] for b in block_feats]
        packed[scorer.feature] = torch.cat(features, scorer.slot_axis).to(device, torch.float32)
    return packed


def score_blocks(
    question_feats: dict[str, torch.Tensor],
    block_feats: Sequence[dict[str, torch.Tensor]],
    weights: dict[str, float] | None = None,
) -> torch.Tensor:
    """Relevance [B, num_blocks] of every stored block to every question (higher = more relevant): the weighted sum
    of the scorers' z-scores. Rows are scored one by one (padding removed), so a batch equals its rows."""
    return score_packed(question_feats, pack_blocks(block_feats, question_feats["mask"].device), weights)


def check_weights(weights: dict) -> None:
    """Raise ValueError unless every key of `weights` names a scorer of `SCORERS` (and every value is a number)."""
    unknown = set(weights) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown score weights {sorted(unknown)}; use {' and '.join(map(repr, SCORERS))}")
    bad = {k: v for k, v in weights.items() if isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad:
        raise ValueError(f"score weights must be numbers, got {bad}")


def score_packed(question_feats: dict[str, torch.Tensor], packed: dict, weights: dict[str, float] | None = None):
    """`score_blocks` against blocks already packed by `pack_blocks`."""
    weights = SCORE_WEIGHTS if weights is None else weights
    check_weights(weights)
    mask = question_feats["mask"]
    batch, count = mask.shape[0], packed["count"]
    if not count:
        return question_feats["tokens"].new_zeros(batch, 0)
    rows = []
    for row in range(batch):
        score = question_feats["tokens"].new_zeros(count)
        for name, scorer in SCORERS.items():
            if weights.get(name, 0):
                found = scorer.score(question_feats[scorer.query][row], mask[row], packed[scorer.feature],
                                     packed["segment"], count)
                score = score + weights[name] * _zscore(found)
        rows.append(score)
    return torch.stack(rows)
