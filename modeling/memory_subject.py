"""The subject gate: a block is not read for a prompt that names things the block never mentions.

The scorers (`memory_scoring`) and their cut decide whether a block shares enough with a prompt. A stored fact can
share a prompt's whole phrasing and still be about something else: on CounterFact the edit "The mother tongue of
Danielle Darrieux is English." passes the cut for "Michel Rocard is a native speaker of", and, read there, changes
that prompt's answer. The likelihood check (`memory_check`) does not tell the two apart (the model finds the
relation's words as likely after the edit as a question's words after its passage); what does is that the prompt
names a subject, "Michel Rocard", that the block never mentions.

Subject terms: the user's words (`memory_lexical.user_text`, not the chat template's) that start with a capital
letter and are not the first word of a sentence or line, as terms of the lexical analyzer (case-folded, stemmed,
stop words dropped: "The", "What" never count). A sentence's first word is left out because it is capitalised
anyway ("Describe ...", "Tell me ..."; an instruction beside the question names nothing). A block passes when the
user's words name no subject, or when the text it was written from (all the blocks of that text) shares at least one
of their subject terms; otherwise it is not read for its own score (a neighbour of a block that is read is still read
with it). Two spellings count as one: a dotted acronym is its letters ("U.S." is "US", in prompt and block alike), and
a subject term of 6 letters or more matches a block's term one edit away (a letter left out, added, changed or two
swapped: "Primier" finds "Premier"; a user's typo should not hide the passage it is about). A lower-case prompt
(most NQ questions) names no subject and is never gated; a block stored without its token ids is not gated.

Measured on the dev sets with the cut of the time (bm25+encoder, 0.6), one stored text, n = 200 each
(`benchmarks/subject_gate.py`): the CounterFact neighbourhood prompts that read their lone edit fall from 0.195 to
0.015 (the edit's own prompt 1.00, paraphrases 1.00 -> 0.98), SQuAD questions reading their own passage from 0.915 to
0.89 (acronyms: "US" against "United States"), NQ's stay at 0.875; CounterFact specificity goes from 0.83x to 0.98x
of the no-edit rate at unchanged efficacy (`memoryllm-hf eval editing`, README). Because the gate does this, the
scorer's cut for gated reads is lower (`memory_scoring.Scorer.cut`: bm25+encoder 0.45 instead of 0.6), which keeps
the own passage for ~0.95 of questions stored alone at a specificity of 0.93x (README, "With the gate, a lower cut").
"""

import re
from collections.abc import Iterable, Sequence

import torch

from .memory_lexical import Analyzer, TextView, retrieval_tokenizer, sentences

_NAME = re.compile(r"[^\W\d_][\w'’-]*")  # a word that starts with a letter
_STARTS = re.compile(r"(?:^|[.!?:;]\s+|\n\s*|[\"“(]\s*)$")  # what may precede a sentence's first word
_DOTTED = re.compile(r"(?<![^\W\d_])((?:[^\W\d_]\.){2,})")  # a dotted acronym: "U.S.", "e.g."
FUZZY_LENGTH = 6  # subject terms this long match a block's term one edit away


def undotted(text: str) -> str:
    """`text` with its dotted acronyms written as their letters ("the U.S. Navy" -> "the US Navy")."""
    return _DOTTED.sub(lambda match: match.group(1).replace(".", ""), text)


def _deletions(term: str) -> set[str]:
    return {term} | {term[:i] + term[i + 1 :] for i in range(len(term))}


def shares_a_term(named: Iterable[str], terms: set[str]) -> bool:
    """Whether a term of `named` is in `terms`, or (one of `FUZZY_LENGTH` letters or more) one edit away from one
    of them as long: two terms are one edit apart when deleting at most one letter of each makes them equal."""
    named = set(named)
    if named & terms:
        return True
    # (deletion sets only meet for lengths at most one apart)
    near = set().union(*(_deletions(term) for term in named if len(term) >= FUZZY_LENGTH))
    return bool(near) and any(near & _deletions(other) for other in terms if len(other) >= FUZZY_LENGTH)


def subject_terms(analyzer: Analyzer, sentence: str) -> set[str]:
    """The terms of the capitalised words of `sentence` past its first word (see the module docstring)."""
    found: set[str] = set()
    sentence = undotted(sentence)
    for match in _NAME.finditer(sentence):
        word = match.group()
        if word[0].isupper() and not _STARTS.search(sentence[: match.start()]):
            found.update(analyzer.terms(word))
    return found


def names_elsewhere(analyzer: Analyzer, user_words: str, block_text: str) -> bool:
    """True when `user_words` name subjects (in any of their sentences) and `block_text` shares none of their terms."""
    named = set().union(*(subject_terms(analyzer, sentence) for sentence in sentences(undotted(user_words))))
    return bool(named) and not shares_a_term(named, set(analyzer.terms(undotted(block_text))))


class SubjectGate:
    """The gate of one model's reads (`RetrieveRead.gate`, with `config.retrieval_subject_gate`): `refused` gives
    the blocks a prompt row does not read for their own score. Keeps the text view of the tokenizer it last used."""

    def __init__(self):
        self.view: TextView | None = None
        self.analyzer = Analyzer()

    @staticmethod
    def configured(config) -> bool:
        return bool(config.retrieval_subject_gate)

    def text_view(self, model) -> TextView:
        tokenizer = retrieval_tokenizer(model)
        if self.view is None or self.view.tokenizer is not tokenizer:
            self.view = TextView(tokenizer)
        return self.view

    def refused(self, model, store: Sequence, scores: torch.Tensor, row: Sequence[int]) -> set[int]:
        """Indices of the blocks the prompt row `row` (token ids) names nothing of, among those the read could take
        for their own score: every block from `config.retrieval_threshold` on (few pass a calibrated cut); without
        a threshold, best first until the blocks that pass fill `read_tokens`."""
        cfg = model.config
        view = self.text_view(model)
        words = view.user_texts([row])[0]
        order = sorted(range(len(store)), key=lambda i: (-float(scores[i]), -i))
        refused, filled = set(), 0
        for index in order:
            if cfg.retrieval_threshold is not None:
                if float(scores[index]) < cfg.retrieval_threshold:
                    break
            elif filled >= cfg.read_tokens:
                break
            block = store[index]
            if block.token_ids is not None and names_elsewhere(self.analyzer, words, self.text_of(store, index)):
                refused.add(index)
            else:
                filled += block.num_slots
        return refused

    def text_of(self, store: Sequence, index: int) -> str:
        """The text block `index` was written from: its own and the neighbouring blocks of the same text (`call`,
        the first update of the text; a long text is several blocks, and its subject may be named in one only)."""
        call, first, last = store[index].call, index, index
        while first > 0 and store[first - 1].call == call:
            first -= 1
        while last + 1 < len(store) and store[last + 1].call == call:
            last += 1
        parts = [store[i].token_ids.tolist() for i in range(first, last + 1) if store[i].token_ids is not None]
        return self.view.decode([token for part in parts for token in part])

    def clear(self) -> None:
        self.view = None
