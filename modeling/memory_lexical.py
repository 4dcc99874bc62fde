"""Lexical retrieval: BM25 over the words of every stored injection, indexed incrementally.

Each long-term block keeps the token ids it was written from (`MemoryBlock.token_ids`). Its terms are the
tokenizer's decoded words, case-folded, punctuation stripped, stop words dropped and Snowball-stemmed (`Analyzer`),
so "edwards" finds "Edwards" and "surnames" finds "surname". A question's terms come from the user's words only
(`user_text`: the chat template's markers, system prompt and earlier assistant turns are cut out).

`LexicalIndex` is an inverted index that grows one block at a time (postings appended, document frequencies
counted up; a block that leaves the store is counted down and its postings skipped), so an injection never rebuilds
the index. Scores are BM25 (k1 = 1.2, b = 0.75, Lucene's always-positive IDF) computed at query time from the current
counts, so an incrementally grown index scores exactly like one built from scratch over the same blocks (and like
the bm25s library's "lucene" method, which cannot add a document to an index without rebuilding it).

"Nothing relevant" must mean the same with one stored block and with 100,000. Raw BM25 grows with the store (IDF
~ log N), so the decision uses `relevance`: BM25 divided by the best score the question could reach (every term
present, saturated), with IDFs computed as if the store also held `BACKGROUND_BLOCKS` blocks with none of the
question's terms (a store of one block then does not make every word look rare). Calibrated on the dev sets (see
`benchmarks/lexical_recall.py`): `RELEVANCE_THRESHOLD`.

Stemming uses PyStemmer (the Snowball C stemmer; a dependency of memoryllm-hf) or, when it is missing,
`snowballstemmer` (the same Snowball algorithm in pure Python, identical stems); with neither, words are not stemmed
(a warning says so).
"""

import array
import functools
import math
import re
import warnings
from collections.abc import Iterable, Sequence

import torch

try:  # PyStemmer: Snowball in C (install_requires of memoryllm-hf)
    import Stemmer as _pystemmer
except ImportError:  # pragma: no cover - depends on the environment
    _pystemmer = None
try:  # the same algorithm in pure Python (fallback)
    import snowballstemmer as _snowball
except ImportError:  # pragma: no cover - depends on the environment
    _snowball = None

K1: float = 1.2
B: float = 0.75
# Empty blocks the IDF assumes beside the store (see the module docstring); calibrated with RELEVANCE_THRESHOLD.
BACKGROUND_BLOCKS: int = 1000
# `relevance` at or above which a block counts as relevant (calibrated on the dev sets, chat prompts; see
# docs/results/lexical_recall_*.json: the question's own passage passes for ~0.75 (NQ) / ~0.9 (SQuAD) of questions at
# every store size; unrelated questions pass for ~0.01 with 1 stored text, but the best of 1,000 unrelated texts
# usually shares enough words: a lexical score alone cannot tell that apart).
RELEVANCE_THRESHOLD: float = 0.1

# The Snowball project's English stop word list (as shipped by NLTK), case-folded.
STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
    himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom this
    that that'll these those am is are was were be been being have has had having do does did doing a an the and but
    if or because as until while of at by for with about against between into through during before after above below
    to from up down in out on off over under again further then once here there when where why how all any both each
    few more most other some such no nor not only own same so than too very s t can will just don don't should
    should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't
    haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't
    weren weren't won won't wouldn wouldn't""".split()
)
_WORD = re.compile(r"[^\W_]+")  # letters and digits; punctuation, underscores and spaces separate words


class Analyzer:
    """Text -> terms: words (letters/digits runs) case-folded, stop words dropped, stemmed (cached per word)."""

    def __init__(self, language: str = "english"):
        self.language = language
        if _pystemmer is not None:
            self.stemmer = _pystemmer.Stemmer(language).stemWord
        elif _snowball is not None:
            self.stemmer = _snowball.stemmer(language).stemWord
        else:
            warnings.warn(
                "neither PyStemmer nor snowballstemmer is installed: lexical retrieval matches unstemmed words "
                "('surnames' will not find 'surname'); pip install PyStemmer",
                stacklevel=2,
            )
            self.stemmer = lambda word: word
        self.stem = functools.lru_cache(maxsize=1 << 16)(self.stemmer)

    def terms(self, text: str) -> list[str]:
        words = _WORD.findall(text.casefold())
        return [self.stem(word) for word in words if word not in STOP_WORDS]


# ------------------------------------------------------------------------------------------- the user's words
SENTINELS = ("\ue000first\ue000", "\ue000second\ue000", "\ue000third\ue000")


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n :]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def chat_markers(tokenizer) -> tuple[str, str] | None:
    """(text that starts a user message, text that ends it) in the tokenizer's chat template, found by rendering
    a conversation of sentinel messages; None without a chat template (then a prompt is all user words)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    first, second, third = SENTINELS
    try:
        one = tokenizer.apply_chat_template([{"role": "user", "content": first}], tokenize=False)
        three = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": first},
                {"role": "assistant", "content": second},
                {"role": "user", "content": third},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # a template that refuses these messages: treat prompts as plain text
        return None
    if first not in one or not all(s in three for s in SENTINELS):
        return None
    # what precedes a user message both at the start and after an assistant turn; what follows one both before an
    # assistant turn and at the end (before the generation prompt)
    start = _common_suffix(one[: one.index(first)], three[three.index(second) + len(second) : three.index(third)])
    after_first = three[three.index(first) + len(first) : three.index(second)]
    end = _common_prefix(after_first, three[three.index(third) + len(third) :])
    start, end = start.lstrip(), end.rstrip() or end
    if not start.strip() or not end:
        return None
    return start, end


def user_text(text: str, markers: tuple[str, str] | None) -> str:
    """The user's words of a prompt `text`: the content of every user message (a prompt without the template's
    user marker is all user words; an unfinished last message runs to the end)."""
    if markers is None or markers[0] not in text:
        return text
    start, end = markers
    parts = []
    for piece in text.split(start)[1:]:
        parts.append(piece.split(end, 1)[0])
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------- the index
def _bm25_idf(df: torch.Tensor, count: float) -> torch.Tensor:
    """Lucene's BM25 IDF, ln(1 + (N - df + 0.5) / (df + 0.5)) (float64)."""
    return torch.log1p((count - df + 0.5) / (df + 0.5))


class LexicalIndex:
    """An incremental BM25 index over documents (the store's blocks), each added once under a hashable key.

    `add(key, terms)` and `remove(key)` cost the document's own terms, never the whole index; `scores(terms, keys)`
    returns BM25 and `relevance` for the given documents (in that order) from the current counts.
    """

    def __init__(self, k1: float = K1, b: float = B, background: int = BACKGROUND_BLOCKS):
        self.k1, self.b, self.background = k1, b, background
        self.vocab: dict[str, int] = {}
        self.df = array.array("q")  # live documents holding each term
        self.postings: list[tuple[array.array, array.array]] = []  # per term: (doc slots, term frequencies)
        self.slot_of: dict = {}  # document key -> slot
        self.doc_terms: list[tuple[array.array, array.array] | None] = []  # per slot: (term ids, tf); None = removed
        self.doc_length = array.array("q")  # terms per slot (0 once removed)
        self.live = 0
        self.total_length = 0

    def __len__(self) -> int:
        return self.live

    def __contains__(self, key) -> bool:
        return key in self.slot_of

    def add(self, key, terms: Iterable[str]) -> None:
        if key in self.slot_of:
            raise KeyError(f"document {key!r} is already indexed")
        counts: dict[int, int] = {}
        length = 0
        for term in terms:
            index = self.vocab.get(term)
            if index is None:
                index = self.vocab[term] = len(self.vocab)
                self.df.append(0)
                self.postings.append((array.array("i"), array.array("i")))
            counts[index] = counts.get(index, 0) + 1
            length += 1
        slot = len(self.doc_terms)
        for index, tf in counts.items():
            self.df[index] += 1
            docs, tfs = self.postings[index]
            docs.append(slot)
            tfs.append(tf)
        self.slot_of[key] = slot
        self.doc_terms.append((array.array("i", counts.keys()), array.array("i", counts.values())))
        self.doc_length.append(length)
        self.live += 1
        self.total_length += length

    def remove(self, key) -> None:
        slot = self.slot_of.pop(key)
        term_ids, _ = self.doc_terms[slot]
        for index in term_ids:
            self.df[index] -= 1
        self.doc_terms[slot] = None
        self.live -= 1
        self.total_length -= self.doc_length[slot]
        self.doc_length[slot] = 0
        if len(self.doc_terms) > 64 and self.live < len(self.doc_terms) // 2:
            self._compact()

    def _compact(self) -> None:
        """Drop removed documents' postings (amortised: runs when half the slots are dead)."""
        keys = sorted(self.slot_of, key=self.slot_of.get)
        renumber = {self.slot_of[key]: new for new, key in enumerate(keys)}
        self.postings = [
            (array.array("i", [renumber[d] for d in docs if d in renumber]),
             array.array("i", [t for d, t in zip(docs, tfs, strict=True) if d in renumber]))
            for docs, tfs in self.postings
        ]
        self.doc_terms = [self.doc_terms[self.slot_of[key]] for key in keys]
        self.doc_length = array.array("q", [len_ for slot, len_ in enumerate(self.doc_length) if slot in renumber])
        self.slot_of = {key: renumber[self.slot_of[key]] for key in keys}

    def query_ids(self, terms: Iterable[str]) -> tuple[list[int], int]:
        """(ids of the distinct known terms, number of distinct terms): each term counts once, however often the
        prompt repeats it."""
        distinct = dict.fromkeys(terms)
        return [self.vocab[t] for t in distinct if t in self.vocab], len(distinct)

    def scores(self, terms: Sequence[str], keys: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(BM25 [len(keys)], relevance [len(keys)]) of the documents `keys` for a query of `terms` (float64).

        BM25 (Lucene's form, as in bm25s: sum of idf * tf / (tf + k1 * (1 - b + b * length / average length)),
        without the constant factor k1 + 1) uses the live documents' counts; relevance (in [0, 1)) is the BM25 of the
        same query with IDFs that count `background` extra empty documents, divided by its upper bound sum(idf)."""
        slots = torch.tensor([self.slot_of[key] for key in keys], dtype=torch.long)
        bm25 = torch.zeros(len(self.doc_terms), dtype=torch.float64)
        relevance = torch.zeros(len(self.doc_terms), dtype=torch.float64)
        ids, distinct = self.query_ids(terms)
        if not distinct or not self.live:
            return bm25[slots], relevance[slots]
        length = torch.frombuffer(self.doc_length, dtype=torch.int64).double() if self.doc_length else bm25
        average = max(self.total_length / self.live, 1e-9)
        norm = self.k1 * (1 - self.b + self.b * length / average)
        df = torch.tensor([self.df[i] for i in ids], dtype=torch.float64)
        idf = _bm25_idf(df, self.live)
        prior_idf = _bm25_idf(df, self.live + self.background)
        # terms the store has never seen reach the bound only (df = 0)
        unseen = distinct - len(ids)
        bound = float(prior_idf.sum()) + unseen * math.log1p((self.live + self.background + 0.5) / 0.5)
        for position, index in enumerate(ids):
            docs, tfs = self.postings[index]
            if not docs:
                continue
            docs = torch.frombuffer(docs, dtype=torch.int32).long()
            tf = torch.frombuffer(tfs, dtype=torch.int32).double()
            part = tf / (tf + norm[docs])
            bm25.index_add_(0, docs, idf[position] * part)
            relevance.index_add_(0, docs, prior_idf[position] * part)
        return bm25[slots], relevance[slots] / bound


def block_terms(analyzer: Analyzer, decode, token_ids: torch.Tensor) -> list[str]:
    """The terms of one stored block from its token ids (`decode`: the tokenizer's ids -> text)."""
    return analyzer.terms(decode(token_ids.tolist()))


def reciprocal_rank(scores: torch.Tensor) -> torch.Tensor:
    """1 / (60 + rank) of every entry (rank 1 = best; ties share the better rank): reciprocal rank fusion."""
    order = scores.argsort(descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return 1.0 / (60 + ranks.double())


# ------------------------------------------------------------------------------------------ the model's scorer
# Text scorers of `config.retrieval_scorer` (besides "model": the model-feature scorers of `memory_retrieval`).
TEXT_SCORERS = ("bm25", "bm25+encoder")
# Threshold on the "bm25+encoder" score (relevance + cosine), calibrated like RELEVANCE_THRESHOLD (NQ: own passage
# passes for ~0.83 at every store size; unrelated questions 0.0 / 0.01 / 0.01 / 0.15 with 1 / 10 / 100 / 1,000 texts).
ENCODER_THRESHOLD: float = 0.5
# The calibrated `config.retrieval_threshold` of each text scorer, and the margin below the best block past which
# nothing is read (`from_base` defaults; chosen on the dev sets with benchmarks/lexical_recall.py: with 1,000 stored
# NQ texts and 4 updates of budget, bm25 reads the question's passage for 0.75 of questions and 162 other tokens per
# question (no cut: 0.86 and 930), bm25+encoder 0.82 and 19 (no cut: 0.99 and 917)).
THRESHOLDS = {"bm25": RELEVANCE_THRESHOLD, "bm25+encoder": ENCODER_THRESHOLD}
MARGINS = {"bm25": 0.05, "bm25+encoder": 0.1}


def text_scorer_defaults(memory_config: dict) -> None:
    """`from_base` settings of a text scorer (unless given): its calibrated threshold and margin."""
    scorer = memory_config.get("retrieval_scorer")
    if scorer in THRESHOLDS:
        memory_config.setdefault("retrieval_threshold", THRESHOLDS[scorer])
        memory_config.setdefault("retrieval_margin", MARGINS[scorer])


class TextScorer:
    """Scores stored blocks against prompts from text: BM25 `relevance` over the blocks' words (and, for
    "bm25+encoder", plus the cosine of sentence-encoder embeddings; see `memory_dense`).

    `tokenizer`: the model's (decodes block and prompt token ids; its chat template tells the user's words). The
    index follows the store: `sync(store)` indexes the blocks it has not seen and forgets those that left (an
    injection costs its own block), then `score` ranks the store's blocks for a batch of prompts.
    """

    def __init__(self, tokenizer, kind: str = "bm25", encoder=None):
        if kind not in TEXT_SCORERS:
            raise ValueError(f"text scorer must be one of {TEXT_SCORERS}, got {kind!r}")
        self.tokenizer, self.kind = tokenizer, kind
        self.analyzer = Analyzer()
        self.markers = chat_markers(tokenizer)
        self.index = LexicalIndex()
        self.encoder = None
        self.embeddings: dict = {}  # block -> unit embedding (bm25+encoder)
        self.stacked: tuple = (None, None)  # (store, its blocks' embeddings [n, dim])
        if kind == "bm25+encoder":
            from .memory_dense import SentenceEncoder

            self.encoder = encoder or SentenceEncoder()

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def sync(self, store: Sequence) -> None:
        """Index the store's new blocks, forget blocks no longer in it (eviction, undo, a loaded memory)."""
        present = set(store)
        for block in [key for key in self.index.slot_of if key not in present]:
            self.index.remove(block)
            self.embeddings.pop(block, None)
        new = [block for block in store if block not in self.index]
        texts = [self.decode(b.token_ids.tolist()) if b.token_ids is not None else "" for b in new]
        for block, text in zip(new, texts, strict=True):
            self.index.add(block, self.analyzer.terms(text))
        if self.encoder is not None and new:
            for block, vector in zip(new, self.encoder.encode(texts), strict=True):
                self.embeddings[block] = vector

    def query_text(self, ids: Sequence[int]) -> str:
        """The user's words of one prompt row (padding already removed)."""
        return user_text(self.decode(ids), self.markers)

    def score(self, store: Sequence, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores [len(rows), len(store)] (float32) of the store's blocks for each prompt row's token ids."""
        self.sync(store)
        texts = [self.query_text(ids) for ids in rows]
        out = torch.zeros(len(rows), len(store), dtype=torch.float64)
        if not store:
            return out.float()
        keys = list(store)
        for row, text in enumerate(texts):
            out[row] = self.index.scores(self.analyzer.terms(text), keys)[1]
        if self.encoder is not None:
            if self.stacked[0] is not store:  # stacked once per store (a new tuple after every injection)
                self.stacked = (store, torch.stack([self.embeddings[block] for block in keys]))
            out += (self.encoder.encode(texts) @ self.stacked[1].T).double()
        return out.float()
