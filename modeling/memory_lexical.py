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
import hashlib
import json
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
# `relevance` (the best over the prompt's `user_queries`) at or above which a block counts as relevant, calibrated on
# the dev sets with chat prompts (docs/results/lexical_recall_*.json, docs/results/edit_relevance.json): the
# question's own passage passes for ~0.85 (NQ) / ~0.94 (SQuAD) of questions at every store size; unrelated questions
# pass for ~0.0 / 0.03 with 1 stored text, but the best of 1,000 unrelated texts usually shares enough words (a
# lexical score alone cannot tell that apart); a CounterFact neighbourhood prompt (the edit's relation, another
# subject) passes a lone edit for 0.22, as the whole-prompt score did at its cut of 0.1.
RELEVANCE_THRESHOLD: float = 0.15

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

    def __reduce__(self):
        # (the stemmer is a C object that cannot be copied or pickled: a copy is a new analyzer of the language,
        # so `copy.deepcopy(model)` and pickling work with a lexical part or the subject gate in place)
        return type(self), (self.language,)

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


_SENTENCE_END = re.compile(r"(?<=[.?!])\s+|\n+")  # a line break, or whitespace after a sentence's end


def sentences(text: str) -> list[str]:
    """The sentences and lines of a text that hold a word, in order, each once, stripped."""
    pieces = [piece.strip() for piece in _SENTENCE_END.split(text)]
    return [piece for piece in dict.fromkeys(pieces) if _WORD.search(piece)]


def user_queries(text: str) -> list[str]:
    """What a prompt's user words are scored as: the whole text and, when it has several, each of its sentences and
    lines (a block scores its best over them). An instruction sentence beside the question ("Answer with a short
    phrase.") then no longer dilutes the question's match: its own score is low, the question's is not."""
    pieces = sentences(text)
    return [text] + [piece for piece in pieces if piece != text.strip()] if len(pieces) > 1 else [text]


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
        counts: dict[str, int] = {}
        length = 0
        for term in terms:
            counts[term] = counts.get(term, 0) + 1
            length += 1
        self.add_counted(key, counts, length)

    def add_counted(self, key, term_counts: dict[str, int], length: int) -> None:
        """`add` of a document given as {term: count} (in order of first occurrence) and its length in terms."""
        if key in self.slot_of:
            raise KeyError(f"document {key!r} is already indexed")
        counts: dict[int, int] = {}
        for term, tf in term_counts.items():
            index = self.vocab.get(term)
            if index is None:
                index = self.vocab[term] = len(self.vocab)
                self.df.append(0)
                self.postings.append((array.array("i"), array.array("i")))
            counts[index] = tf
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


# ------------------------------------------------------------------------------------------ the scorer parts
# Thresholds on the "bm25+encoder" score (relevance + cosine, each the best over the prompt's `user_queries`).
# Without the subject gate (memory_subject), calibrated like RELEVANCE_THRESHOLD: the best cut over all store sizes on
# both dev sets (0.61 NQ, 0.63 SQuAD); the own passage passes for ~0.86 (NQ) / ~0.94 (SQuAD) at every store size,
# unrelated questions for 0.0 with 1 stored text; a CounterFact neighbourhood prompt passes a lone edit for 0.20.
# With the gate (the `from_base` default), which refuses a lone edit to 0.015 of those prompts at 0.6, the cut is set
# where the own passage of a dev question stored alone passes for ~0.95 of both sets (200 questions each: 0.955 SQuAD,
# 0.945 NQ at 0.45 against 0.90 / 0.875 at 0.6), a lone edit for 0.055 of neighbourhood prompts, an unrelated
# passage for 0.02 / 0.005 of questions. The price: with 1,000 stored texts an NQ question whose passage is not stored
# reads something for 1.00 of questions (0.23 at 0.6; lower-case questions are never gated; README, goals table).
# (These and the margins are the `memory_scoring.RETRIEVAL_SCORERS` entries' calibrated cuts.)
ENCODER_THRESHOLD: float = 0.45
ENCODER_THRESHOLD_WITHOUT_GATE: float = 0.6
# Threshold on the "bm25+encoder+sentences" score (relevance + cosine + the best sentence piece's cosine), calibrated
# the same way: the best cut over all store sizes on NQ dev (1.004; SQuAD's 1.19 would drop NQ passages); the own
# passage passes for ~0.9 (NQ) / ~0.95 (SQuAD) at every store size, unrelated questions for 0.0 / 0.02 with 1 stored
# text; a CounterFact neighbourhood prompt passes a lone edit for 0.22.
SENTENCES_THRESHOLD: float = 1.0
# Threshold on the "bm25+bigrams+encoder+sentences" score (the above + the "bigrams" part's relevance), calibrated
# the same way: the best cut over all store sizes on NQ dev (1.118); the own passage passes for ~0.86-0.87 (NQ) /
# ~0.94 (SQuAD) at every store size, unrelated NQ questions for 0.0 with 1 stored text and 0.26 with 1,000.
BIGRAMS_THRESHOLD: float = 1.1


def retrieval_tokenizer(model):
    """The tokenizer the text scorers decode with: `model.retrieval_tokenizer` (set by `memoryllm_hf.load`, `from_base`
    and `inject(text, tokenizer=...)`), else the one saved with the checkpoint."""
    if model.retrieval_tokenizer is None:
        from transformers import AutoTokenizer

        try:
            # (no remote code: the tokenizer files name a stock class; asking would prompt a user who already trusted
            # this checkpoint's model code)
            model.retrieval_tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"retrieval_scorer={model.config.retrieval_scorer!r} decodes token ids to words and found no "
                f"tokenizer ({type(err).__name__}: {err}); set model.retrieval_tokenizer = tokenizer"
            ) from None
    return model.retrieval_tokenizer


def tokenizer_identity(tokenizer) -> str:
    """What the words of a block depend on besides its token ids: the tokenizer's class and a digest of its whole
    definition (a fast tokenizer's serialized form: vocabulary, merges, decoder; else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]), ensure_ascii=False)
    return f"{type(tokenizer).__name__}:{hashlib.sha256(content.encode()).hexdigest()[:16]}"


# What is read between the blocks of two texts (or two chunks of one text that are not consecutive) and after the
# last block, before the user's words.
SEPARATOR = "\n\n"
SEPARATOR_WORD = "The"  # (a word the separator is tokenized before)


def separator_ids(tokenizer) -> list[int]:
    """`SEPARATOR`'s token ids as `tokenizer` writes them before a word (a byte-level BPE writes a blank line before a
    word as two newline tokens, and one at the end of a text as one), so a read passage is tokenized as it would be
    in the prompt; the ids of `SEPARATOR` alone when the word's ids do not follow them unchanged."""
    ids = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    word, between = ids(SEPARATOR_WORD), ids(SEPARATOR + SEPARATOR_WORD)
    if len(between) > len(word) and between[-len(word) :] == word:
        return between[: -len(word)]
    return ids(SEPARATOR)


class TextView:
    """The words the text scorers read: a stored block's text (its token ids decoded with the model's tokenizer)
    and a prompt row's user words (`user_text`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.markers = chat_markers(tokenizer)
        self._identity: str | None = None

    @property
    def identity(self) -> str:
        if self._identity is None:
            self._identity = tokenizer_identity(self.tokenizer)
        return self._identity

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def block_text(self, block) -> str:
        return self.decode(block.token_ids.tolist()) if block.token_ids is not None else ""

    def user_texts(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """The user's words of each prompt row (padding already removed)."""
        return [user_text(self.decode(ids), self.markers) for ids in rows]

    def user_queries(self, rows: Sequence[Sequence[int]]) -> list[list[str]]:
        """Each prompt row's queries (`user_queries`: its user words whole and sentence by sentence)."""
        return [user_queries(text) for text in self.user_texts(rows)]


def index_tensor_names(prefix: str) -> tuple[str, ...]:
    """The persisted tensors of a `LexicalIndex` part: vocabulary, terms, counts, sizes, lengths."""
    return tuple(f"{prefix}_{name}" for name in ("vocab", "terms", "tf", "sizes", "lengths"))


def term_pairs(terms: Sequence[str]) -> list[str]:
    """Adjacent pairs of `terms` ("capit", "franc", "pari" -> "capit franc", "franc pari"): the "bigrams" terms."""
    return [f"{first} {second}" for first, second in zip(terms, terms[1:], strict=False)]


class Bm25Scorer:
    """Scorer part "bm25" (see `memory_scoring`): BM25 `relevance` of each stored block's words to the user's words
    (the best over `user_queries`: the words whole and each sentence).

    Its index (`LexicalIndex`, keyed by block) follows the store: `sync(store)` indexes the blocks it has not seen
    and forgets those that left (an injection costs its own block). Persisted (`to_tensors` / `restore`): each
    block's distinct terms, their counts and its length, so a loaded folder neither decodes nor stems its blocks.
    """

    reads_words = True
    needs_encoder = False
    prefix = "bm25"  # of its identity and persisted tensor names
    persisted = index_tensor_names(prefix)

    def __init__(self, model):
        self.text = TextView(retrieval_tokenizer(model))
        self.analyzer = Analyzer()
        self.index = LexicalIndex()

    @property
    def identity(self) -> str:
        return f"{self.prefix}:k1={self.index.k1},b={self.index.b},bg={self.index.background};" \
               f"{self.analyzer.language};{self.text.identity}"

    def terms(self, text: str) -> list[str]:
        """What the index counts of a text (a block's or a query's): its analyzed terms."""
        return self.analyzer.terms(text)

    def sync(self, store: Sequence) -> None:
        present = set(store)
        for block in [key for key in self.index.slot_of if key not in present]:
            self.index.remove(block)
        for block in store:
            if block not in self.index:
                self.index.add(block, self.terms(self.text.block_text(block)))

    def has(self, block) -> bool:
        return block in self.index

    def score(self, model, store: Sequence, prompts) -> torch.Tensor:
        out = torch.zeros(len(prompts.rows), len(store), dtype=torch.float64)
        if not store:
            return out
        keys = list(store)
        for row, queries in enumerate(self.text.user_queries(prompts.rows)):
            relevance = [self.index.scores(self.terms(query), keys)[1] for query in queries]
            out[row] = torch.stack(relevance).amax(0)
        return out

    def to_tensors(self, store: Sequence) -> dict[str, torch.Tensor]:
        """The index entries of `store`'s blocks, in store order (all blocks must be indexed)."""
        vocab, local, terms, tfs, sizes, lengths = list(self.index.vocab), {}, [], [], [], []
        for block in store:
            term_ids, counts = self.index.doc_terms[self.index.slot_of[block]]
            for term in term_ids:
                terms.append(local.setdefault(term, len(local)))
            tfs.extend(counts)
            sizes.append(len(term_ids))
            lengths.append(self.index.doc_length[self.index.slot_of[block]])
        words = "\n".join(vocab[term] for term in local).encode()
        vocab_name, terms_name, tf_name, sizes_name, lengths_name = self.persisted
        return {
            vocab_name: torch.tensor(list(words), dtype=torch.uint8),
            terms_name: torch.tensor(terms, dtype=torch.int32),
            tf_name: torch.tensor(tfs, dtype=torch.int32),
            sizes_name: torch.tensor(sizes, dtype=torch.int64),
            lengths_name: torch.tensor(lengths, dtype=torch.int64),
        }

    def restore(self, tensors: dict[str, torch.Tensor], entries: Sequence[tuple[int, object]]) -> None:
        """Index blocks from persisted entries: `entries` [(entry number in `tensors`, block)]."""
        vocab_name, terms_name, tf_name, sizes_name, lengths_name = self.persisted
        words = bytes(tensors[vocab_name].numpy()).decode().split("\n") if tensors[vocab_name].numel() else []
        sizes = tensors[sizes_name].tolist()
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + size)
        terms, tfs, lengths = tensors[terms_name].tolist(), tensors[tf_name].tolist(), tensors[lengths_name]
        if starts[-1] != len(terms) or len(terms) != len(tfs) or (terms and max(terms) >= len(words)):
            raise ValueError(f"the persisted {self.prefix} index is inconsistent")
        for entry, block in entries:
            if block in self.index:
                continue
            span = range(starts[entry], starts[entry + 1])
            self.index.add_counted(block, {words[terms[i]]: tfs[i] for i in span}, int(lengths[entry]))


class BigramScorer(Bm25Scorer):
    """Scorer part "bigrams": BM25 relevance over each block's *adjacent term pairs* (terms as "bm25" counts them,
    so pairs skip stop words: "capital of France" -> "capit franc"), the ordered-phrase part of Metzler and Croft's
    sequential dependence model (SIGIR 2005). A question written from a sentence of its passage keeps some of that
    sentence's phrases; a paragraph of the same article that shares the question's words but not its phrases (the
    passages that outrank a SQuAD question's own) scores lower. The same index, sync and persistence as "bm25"
    (tensors `bigrams_*`)."""

    prefix = "bigrams"
    persisted = index_tensor_names(prefix)

    def terms(self, text: str) -> list[str]:
        return term_pairs(self.analyzer.terms(text))
