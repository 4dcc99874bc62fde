"""The one table of retrieval scorers: what `config.retrieval_scorer` names, how its parts are fused, where its
absolute "nothing relevant" cut lies, and the persisted index that lets a loaded folder score without re-indexing.

A scorer *part* is one class with one interface (`PARTS`, one line each):

- `__init__(model)`: created once per model, on the first scoring that needs it (a text part takes the model's
  tokenizer; the encoder part loads its weights), so a part that is not configured costs nothing;
- `sync(store)`: index the blocks it has not seen and forget those that left (an injection, an eviction, an undo,
  a loaded memory); incremental: an injection costs its own block; `has(block)`: whether a block is indexed;
- `score(model, store, prompts)`: scores [B, len(store)] of the store's blocks for a prompt batch (`Prompts`);
- optionally persisted: `persisted` (its tensor names; empty: nothing), `identity` (what its index depends on
  besides the blocks: tokenizer, analyzer, encoder), `to_tensors(blocks)` / `restore(tensors, entries)`.
  `reads_words`: it reads the prompt's token ids (not only `inputs_embeds`); `needs_encoder`: it needs the
  sentence encoder's weights installed (`scorer_available`).

A *scorer* (`RETRIEVAL_SCORERS`, one line each; its name is a value of `config.retrieval_scorer`) is a tuple of
parts whose scores are added (`fuse`), with the calibrated absolute cut `threshold` (a score at which a block counts
as relevant, meant to mean the same with 1 stored block and with 100,000; the gated bm25+encoder cut gives some of
that up for prompts the gate cannot act on, see README) and `margin` (below the best block) that
`from_base` sets (`scorer_defaults`), and that `select_injections` (memory_reader) applies. A scorer may have a
higher cut for reads without the subject gate (`threshold_without_gate`): the gate (memory_subject, on by default
with a text scorer) keeps a prompt that names another subject off a block, so with it the cut only needs to tell
related from unrelated words and can keep more of what a question is about.

The persisted index (`retrieval_index.safetensors` beside the store, a part of `memory_files.MEMORY_PARTS`; inside a
single-file memory state too): each persisted part's entries for the blocks it has indexed, keyed per block by a
digest of its injection number, call and token ids (`block_key`), with each part's `identity` and a content hash.
A loaded index is checked and applied block by block: an entry whose block is no longer the same (the store changed
behind it) or a part of another identity is not used, a corrupted file is ignored, each with a logged message, and
what it does not cover is indexed as usual: never a wrong score, at worst the indexing it was meant to save.
"""

import dataclasses
import functools
import hashlib
import json

import torch
from transformers.utils import logging

from .atomic_io import tensors_digest
from .memory_dense import EncoderScorer, SentencesScorer
from .memory_lexical import (
    BIGRAMS_THRESHOLD,
    ENCODER_THRESHOLD,
    ENCODER_THRESHOLD_WITHOUT_GATE,
    RELEVANCE_THRESHOLD,
    SENTENCES_THRESHOLD,
    BigramScorer,
    Bm25Scorer,
)
from .memory_retrieval import ModelScorer

logger = logging.get_logger(__name__)

# The scorer parts by name.
PARTS = {"model": ModelScorer, "bm25": Bm25Scorer, "bigrams": BigramScorer, "encoder": EncoderScorer,
         "sentences": SentencesScorer}


@dataclasses.dataclass(frozen=True)
class Scorer:
    """One value of `config.retrieval_scorer`: its parts (scores added) and the `from_base` cuts (None: none):
    `threshold` with the subject gate on (`from_base`'s default for a text scorer), `threshold_without_gate` when
    it is off (None: the same)."""

    parts: tuple[str, ...]
    threshold: float | None = None
    margin: float | None = None
    threshold_without_gate: float | None = None

    def cut(self, subject_gate: bool) -> float | None:
        """The calibrated threshold for reads with or without the subject gate."""
        if subject_gate or self.threshold_without_gate is None:
            return self.threshold
        return self.threshold_without_gate


# The retrieval scorers by `config.retrieval_scorer` value. Cuts chosen on the dev sets with
# benchmarks/lexical_recall.py: with 1,000 stored NQ texts and 4 updates of budget, bm25 reads the question's passage
# for 0.75 of questions and 162 other tokens per question (no cut: 0.86 and 930), bm25+encoder 0.82 and 19 (no cut:
# 0.99 and 917). "model" is z-scored over the stored blocks: no absolute cut holds for it (set one per model, see
# memory_retrieval).
RETRIEVAL_SCORERS = {
    "model": Scorer(("model",)),
    "bm25": Scorer(("bm25",), RELEVANCE_THRESHOLD, 0.05),
    "bm25+encoder": Scorer(("bm25", "encoder"), ENCODER_THRESHOLD, 0.1, ENCODER_THRESHOLD_WITHOUT_GATE),
    "bm25+encoder+sentences": Scorer(("bm25", "encoder", "sentences"), SENTENCES_THRESHOLD, 0.1),
    "bm25+bigrams+encoder+sentences": Scorer(("bm25", "bigrams", "encoder", "sentences"), BIGRAMS_THRESHOLD, 0.1),
}
# `from_base`'s choice, best first (dev sets, 300 stored texts: bm25+encoder recall@1 0.87 SQuAD / 0.93 NQ against
# bm25's 0.75 / 0.77): the first whose needs are met (`scorer_available`).
DEFAULT_SCORERS = ("bm25+encoder", "bm25")

INDEX_FORMAT = "memoryllm-hf/retrieval-index/1"
BLOCK_KEYS = "block_keys"


def scorer_available(name: str) -> bool:
    """Whether scorer `name` can run here (the encoder parts need the all-MiniLM-L6-v2 weights installed)."""
    from .memory_dense import encoder_installed

    needs_encoder = any(PARTS[part].needs_encoder for part in RETRIEVAL_SCORERS[name].parts)
    return not needs_encoder or encoder_installed()


def scorer_defaults(memory_config: dict) -> None:
    """`from_base` settings of the configured scorer (unless given): its calibrated threshold (for reads with or
    without the subject gate, as configured) and margin."""
    scorer = RETRIEVAL_SCORERS.get(memory_config.get("retrieval_scorer"))
    if scorer is not None and scorer.threshold is not None:
        memory_config.setdefault("retrieval_threshold", scorer.cut(bool(memory_config.get("retrieval_subject_gate"))))
        memory_config.setdefault("retrieval_margin", scorer.margin)


def fuse(scores: list[torch.Tensor], device) -> torch.Tensor:
    """The scorer's score [B, n] (float32 on `device`): its parts' scores added (in float64)."""
    total = scores[0].double().cpu()
    for more in scores[1:]:
        total = total + more.double().cpu()
    return total.float().to(device)


@dataclasses.dataclass
class Prompts:
    """A prompt batch as the parts read it: token ids and/or embeddings, the attention mask, and each row's ids
    without padding (`rows`, for the parts that read words)."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    inputs_embeds: torch.Tensor | None

    @functools.cached_property
    def rows(self) -> list[list[int]]:
        ids, mask = self.input_ids, self.attention_mask
        masks = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        return [row[keep].tolist() for row, keep in zip(ids, masks, strict=True)]


def block_key(block) -> int:
    """A digest (int64) of what a persisted index entry was computed from: the block's numbers and token ids."""
    digest = hashlib.sha256(f"{block.injection},{block.call},".encode())
    if block.token_ids is not None:
        digest.update(block.token_ids.to(torch.int32).contiguous().numpy().tobytes())
    else:
        digest.update(b"none")
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def store_key(store) -> tuple:
    """Which store this is, cheaply (stores are immutable tuples; an injection or eviction changes an end)."""
    return (len(store), id(store[0]), id(store[-1])) if store else (0,)


def check_index_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Raise ValueError unless (tensors, metadata) is a consistent, uncorrupted persisted retrieval index."""
    if "error" in metadata:
        raise ValueError(metadata["error"])
    if metadata.get("retrieval_index") != INDEX_FORMAT:
        raise ValueError(f"not a retrieval index (format {metadata.get('retrieval_index')!r})")
    if metadata.get("content_hash") != tensors_digest(dict(sorted(tensors.items()))):
        raise ValueError("its content differs from the hash recorded when it was saved")
    keys = tensors.get(BLOCK_KEYS)
    if keys is None or keys.dim() != 1 or keys.dtype != torch.int64:
        raise ValueError(f"{BLOCK_KEYS} must be an int64 vector")
    try:
        parts = json.loads(metadata.get("parts", ""))
    except ValueError:
        parts = None
    if not isinstance(parts, dict) or not all(name in PARTS for name in parts):
        raise ValueError(f"its parts {metadata.get('parts')!r} are not scorer parts")


class Scoring:
    """A model's retrieval scoring (`RetrieveRead.scoring`): the parts created so far, and the persisted index loaded
    with the memory (`adopt`), applied to each part when it is created and saved again until a part replaces it."""

    def __init__(self):
        self.parts: dict = {}
        self.loaded = None  # (tensors, metadata, where) of a persisted index, checked
        self.version = 0  # counts changes of the parts' indexes (new store synced, part created, index adopted)
        self.synced = None  # (len, first and last block ids) of the store last synced
        self.saved = (None, None)  # (key, `index_file` result) of the last index file built

    def scores(self, model, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """Scores [B, stored injections] (float32) of the configured scorer for a prompt batch."""
        kind = model.config.retrieval_scorer
        scorer = RETRIEVAL_SCORERS[kind]
        if input_ids is None and any(PARTS[name].reads_words for name in scorer.parts):
            raise ValueError(f"retrieval_scorer={kind!r} reads the prompt's words: pass input_ids (not only "
                             "inputs_embeds), or set config.retrieval_scorer='model'")
        prompts = Prompts(input_ids, attention_mask, inputs_embeds)
        scores = []
        with model.memory_lock:
            store = model.long_term_memory
            parts = [self.part(model, name, store) for name in scorer.parts]
            for part in parts:
                part.sync(store)
            if self.synced != store_key(store):
                self.synced, self.version = store_key(store), self.version + 1
            for part in parts:
                scores.append(part.score(model, store, prompts))
        device = (input_ids if input_ids is not None else inputs_embeds).device
        return fuse(scores, device)

    def part(self, model, name: str, store):
        if name not in self.parts:
            part = PARTS[name](model)
            if self.loaded is not None and part.persisted:
                self.restore(part, name, store)
            self.parts[name] = part
            self.version += 1
        return self.parts[name]

    # ------------------------------------------------------------------------------------ the persisted index
    def adopt(self, loaded, where: str, store=()) -> None:
        """Take a persisted index loaded with the memory `store` ((tensors, metadata), or None: none): checked now (a
        corrupted one is dropped with a logged message), applied to the parts when they are created."""
        self.loaded = None
        self.version += 1
        if loaded is None:
            return
        tensors, metadata = loaded
        try:
            check_index_file(tensors, metadata)
        except ValueError as err:
            logger.warning(f"{where}: the retrieval index is not used ({err}); the store is indexed again")
            return
        self.loaded = (tensors, metadata, where)
        for name, part in self.parts.items():  # (parts already created: an index loaded later, e.g. a state)
            if part.persisted:
                self.restore(part, name, store)

    def restore(self, part, name: str, store) -> None:
        tensors, metadata, where = self.loaded
        identity = json.loads(metadata["parts"]).get(name)
        if identity is None:
            return
        if identity != part.identity:
            logger.warning(f"{where}: the retrieval index of {name!r} was built with another tokenizer or settings "
                           f"({identity} != {part.identity}): the store is indexed again")
            return
        where_key = {key: entry for entry, key in enumerate(tensors[BLOCK_KEYS].tolist())}
        entries = [(where_key[key], block) for block in store if (key := block_key(block)) in where_key]
        try:
            part.restore(tensors, entries)
        except (ValueError, KeyError, IndexError) as err:
            logger.warning(f"{where}: the retrieval index of {name!r} is not used ({err}); the store is indexed again")
            return
        if len(entries) < len(store):
            logger.info(f"{where}: the retrieval index covers {len(entries)} of {len(store)} stored blocks (the "
                        f"store changed since it was saved): indexing the other {len(store) - len(entries)}")

    def index_file(self, store):
        """The persisted index of `store` ((tensors, metadata); None: nothing to persist): the entries of the blocks
        every persisted part has indexed, or the loaded index as it was when no part was created since."""
        parts = {name: part for name, part in self.parts.items() if part.persisted}
        if not parts:
            return None if self.loaded is None else self.loaded[:2]
        key = (self.version, store_key(store))
        if self.saved[0] == key:  # (any index built is right block by block: a cached one at worst covers less)
            return self.saved[1]
        blocks = [block for block in store if all(part.has(block) for part in parts.values())]
        tensors = {BLOCK_KEYS: torch.tensor([block_key(block) for block in blocks], dtype=torch.int64)}
        for part in parts.values():
            tensors.update(part.to_tensors(blocks))
        tensors = dict(sorted(tensors.items()))
        metadata = {
            "retrieval_index": INDEX_FORMAT,
            "parts": json.dumps({name: part.identity for name, part in parts.items()}),
            "blocks": str(len(blocks)),
            "content_hash": tensors_digest(tensors),
        }
        self.saved = (key, (tensors, metadata))
        return tensors, metadata

    def clear(self) -> None:
        """Forget what depends on the weights (the model part's features; text indexes read no weights)."""
        for part in self.parts.values():
            if hasattr(part, "clear"):
                part.clear()
