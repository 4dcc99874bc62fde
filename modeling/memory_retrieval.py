"""Retrieval scoring: the table of scorers (`SCORERS`), their calibration, and their fusion over a prompt batch.

Every injection (one memory update) is a block of slots [L, k, d]. `block_features` keeps each scorer's small view
of it (computed once per block and weights); at read time `question_features` takes the same views of the prompt's
layer inputs (a memory-less forward) and `score_blocks` ranks the stored blocks. The scorers (`memory_scorers`):
lexical (layer-0 token match with BM25's IDF) and keys (attention mass at calibrated layers).

The scores are z-scored over the stored blocks (per question) and added with the weights of
`config.retrieval_weights` (default `SCORE_WEIGHTS`); `config.retrieval_threshold` on that fused score tells "this
question's injection is stored" from "nothing relevant is".

A feature scorer is one object in `SCORERS` (see `memory_scorers` for its interface: index a block, take a prompt
batch's feature, score a row). A new one is one class plus its line in `SCORERS`; its weight is a key of
`config.retrieval_weights`. Together they are the scorer part "model" (`ModelScorer`) of the one table of retrieval
scorers, `memory_scoring.RETRIEVAL_SCORERS`: its features are computed only when that scorer is configured (or asked
for), block by block, and kept per block in RAM (see the README for bytes per stored token).
"""

from collections.abc import Sequence

import torch
from transformers.masking_utils import create_causal_mask

from .memory_adapters import READ
from .memory_cache import DerivedCache
from .memory_prefix import key_value_weights_fingerprint
from .memory_scorers import KeyScorer, LexicalScorer

# Calibrated on SmolLM2-135M-Instruct ("input" rule) with the dev sets only (shared/data SQuAD and NQ, ~300 stored
# injections; key layers 4-24 and weights 0.25-1 compared): layer 18's attention mass, added at half weight, helps
# both sets. These are the defaults of `config.retrieval_key_layers` / `config.retrieval_weights` (None = these). For
# another model, recalibrate on its own dev questions: run benchmarks/retrieval_recall.py (its JSON gives recall per
# variant and the best block's score for questions whose passage is / is not stored), then set the config fields
# (and `retrieval_threshold` between the two scores). The threshold is on z-scores over the stored blocks, so it
# assumes a store of ~100 blocks or more (with a handful, z-scores say little).
KEY_LAYERS: tuple[int, ...] = (18,)
FEATURE_DTYPE = torch.float16  # stored block features (see `block_features`)
SCORE_WEIGHTS: dict[str, float] = {"lexical": 1.0, "keys": 0.5}


def retrieval_key_layers(num_layers: int, configured: Sequence[int] | None = None) -> tuple[int, ...]:
    """The layers whose keys the "keys" scorer reads: `configured` (`config.retrieval_key_layers`) when given, else
    `KEY_LAYERS` where the model has them, else the same relative depth (a model of another depth: calibrate)."""
    if configured is not None:
        return tuple(configured)
    if all(layer < num_layers for layer in KEY_LAYERS):
        return KEY_LAYERS
    return tuple(sorted({min(num_layers - 1, round(layer / 30 * num_layers)) for layer in KEY_LAYERS}))


def _zscore(scores: torch.Tensor) -> torch.Tensor:
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / scores.std().clamp(min=1e-6)


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
        return {s.feature: s.index(layers, slots, key_layers).to(FEATURE_DTYPE) for s in SCORERS.values()}


@torch.no_grad()
def layer_inputs(decoder, input_ids, inputs_embeds, attention_mask, last: int) -> list[torch.Tensor | None]:
    """The inputs of the decoder's layers 0..`last` for a prompt batch ([B, T, d] each; None for the layers after),
    as `output_hidden_states=True` gives them, from transformers' own parts (embedding, causal mask, rotary
    embedding, decoder layers) run only as deep as `last`: scoring a prompt costs the layers it reads, not a full
    pass. `decoder`: the model's `LlamaModel` (`model.model`)."""
    embeds = decoder.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    mask = create_causal_mask(
        config=decoder.config, inputs_embeds=embeds, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    rotary = decoder.rotary_emb(embeds, position_ids=position_ids)
    states: list[torch.Tensor | None] = [embeds]
    for layer in decoder.layers[:last]:
        states.append(layer(states[-1], attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                            cache=None, use_cache=False))
    return states + [None] * (len(decoder.layers) - last)


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


class ModelScorer:
    """Scorer part "model" (see `memory_scoring`): the z-scored fusion of `SCORERS` (layer-0 token match and attention
    mass) from the model's own features. Each block's features are computed when it is first scored under the
    current weights (`features`, kept per block: an injection costs its own block) and packed once per store
    (`packed`); the prompt's features come from a memory-less forward pass. Nothing is persisted (the features
    depend on the weights and adapters)."""

    reads_words = False
    needs_encoder = False
    persisted = ()

    def __init__(self, model):
        self.features = DerivedCache()
        self.packed = DerivedCache()

    def sync(self, store) -> None:  # (features are computed at scoring, under the weights that score)
        pass

    def score(self, model, store, prompts) -> torch.Tensor:
        cfg, layers = model.config, model.model.layers
        with model.memory_lock:
            dtype, device = model.memory.dtype, model.memory.device
            key_layers = retrieval_key_layers(cfg.num_hidden_layers, cfg.retrieval_key_layers)
            weights = (key_layers, dtype, device) + key_value_weights_fingerprint(layers, None)

            def features(block):
                slots = block.slots.to(device=device, dtype=dtype)
                return block_features(layers, slots, key_layers)

            def packed():  # packed once per store (an immutable tuple: a new one after every injection)
                return pack_blocks([self.features.get(b, weights, lambda b=b: features(b)) for b in store], device)

            packed = self.packed.get(store, weights, packed, limit=1)
        with model.adapters.use(READ):
            hidden = layer_inputs(model.model, prompts.input_ids, prompts.inputs_embeds, prompts.attention_mask,
                                  max(key_layers))
        if not store:
            return hidden[0].new_zeros(hidden[0].shape[0], 0)
        question = question_features(layers, hidden, prompts.attention_mask, key_layers)
        return score_packed(question, packed, cfg.retrieval_weights)

    def clear(self) -> None:
        self.features.clear()
        self.packed.clear()
