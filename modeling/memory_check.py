"""The likelihood check: the model itself weighs the few blocks a read would take by how well they explain the prompt.

The scorer parts (`memory_scoring`) rank blocks by what they share with the prompt, and their cut says whether the
best shares enough. A block can share a prompt's phrasing without being about its subject: on CounterFact a stored
edit ("The mother tongue of Danielle Darrieux is English.") shares "The mother tongue of" with a prompt about another
person, passes the cut, and, read there, changes that prompt's answer. The check asks the model itself (its own
layers, no memory, the adapters as they are): how many nats more likely are the user's words after the block's text
than without it,

    gain(block) = max over the user's queries q of  sum_{t in q} [log p(w_t | text, sep, w_<t) - log p(w_t | sep, w_<t)]

(`sep`: the text read's separator; the queries are `memory_lexical.user_queries`: the user's words whole and each of
their sentences, so an instruction beside the question does not dilute it). A passage about the question's subject
predicts its rare words (a name, a title: many nats each); one sharing only the phrasing predicts common words (a
few).

Two uses, each a config field (None: off), sharing one forward per row over its candidates: the best
`CHECK_CANDIDATES` blocks the selection would take for their own score without the margin (above
`retrieval_threshold`, fitting `read_tokens`; `choose`):
- `retrieval_likelihood_weight` (rerank): a candidate's score becomes its scorer score + weight x gain, and the read
  then chooses among the candidates by it (margin and neighbours as usual). The scorers rank a store's blocks in
  milliseconds; the model then orders the few best by how well each explains the question (as UPR, Sachan et al.
  2022, reranks with a question's likelihood).
- `retrieval_likelihood_gain` (veto): a candidate whose gain is below it is not read.
Blocks that are not candidates are not read. A block stored without its token ids is not checked (gain 0 for the
rerank, passed by the veto).

Measured on the dev sets with `benchmarks/likelihood_check.py` (the veto: CounterFact prompts, paraphrases and
neighbourhood prompts against a lone edit; SQuAD and NQ questions against their own and an unrelated passage) and
`benchmarks/million_tokens.py recall` (the rerank: recall@1 among 1,000 stored injections).
"""

from collections.abc import Sequence

import torch

from .memory_lexical import TextView, retrieval_tokenizer, separator_ids, user_queries
from .memory_prefix import execution_device

# Candidates per prompt row at most: the best blocks the selection would take (one forward reads them all, so the
# check costs about what reading this many blocks as text costs). On the dev sets the own passage is among the best 4
# of 1,000 stored injections for 0.975 (SQuAD) / 0.9675 (NQ) of questions.
CHECK_CANDIDATES: int = 4



@torch.no_grad()
def word_gains(model, passages: Sequence[Sequence[int]], words: Sequence[int], context: Sequence[int]) -> torch.Tensor:
    """[len(passages), len(words)] float32: per token of `words`, its log-probability after `passage + context`
    minus after `context` alone (`context`: at least one token), under the model's layers without memory (one
    right-padded forward over all passages and the baseline)."""
    if not context:
        raise ValueError("word_gains needs at least one context token (the separator) to condition the first word on")
    words, context = list(words), list(context)
    rows = [list(passage) + context + words for passage in passages] + [context + words]
    longest = max(len(row) for row in rows)
    device = execution_device(model.model.embed_tokens)
    ids = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, device=device)
        mask[index, : len(row)] = 1
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    if not words:
        return hidden.new_zeros(len(passages), 0, dtype=torch.float32)
    ends = torch.tensor([len(row) for row in rows], device=device)
    positions = ends[:, None] - len(words) + torch.arange(len(words), device=device)  # [R, W] positions of the words
    states = hidden.gather(1, (positions - 1)[..., None].expand(-1, -1, hidden.shape[-1]))  # the states predicting them
    logprobs = model.lm_head(states).float().log_softmax(-1)
    target = torch.tensor(words, device=device).expand(len(rows), -1)
    scores = logprobs.gather(-1, target[..., None])[..., 0]  # [R, W]
    return (scores[:-1] - scores[-1:]).cpu()


class LikelihoodCheck:
    """The check of one model's reads (`RetrieveRead.check`): `gains(model, row, blocks)` for one prompt row, and
    `choose`, the blocks a row reads with the check in force. Keeps the text view of the tokenizer it last used (the
    user's words and the separator come from it)."""

    def __init__(self):
        self.view: TextView | None = None
        self.context: list[int] = []  # the separator's ids, with the tokenizer's BOS first where it adds one

    @staticmethod
    def configured(config) -> bool:
        return config.retrieval_likelihood_gain is not None or config.retrieval_likelihood_weight is not None

    def text_view(self, model) -> TextView:
        tokenizer = retrieval_tokenizer(model)
        if self.view is None or self.view.tokenizer is not tokenizer:
            self.view = TextView(tokenizer)
            bos = tokenizer.bos_token_id
            adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
            self.context = ([bos] if adds_bos else []) + separator_ids(tokenizer)
        return self.view

    def gains(self, model, row: Sequence[int], blocks: Sequence) -> list[float | None]:
        """Each block's gain (nats, see the module docstring) for the prompt row `row` (token ids, no padding); None
        for a block stored without token ids (not checked)."""
        view = self.text_view(model)
        text = view.user_texts([row])[0]
        encoded = view.tokenizer(text, add_special_tokens=False, return_offsets_mapping=view.tokenizer.is_fast)
        words = list(encoded["input_ids"])
        spans = piece_tokens(text, encoded.get("offset_mapping"), len(words))
        checked = [block for block in blocks if block.token_ids is not None]
        out: dict[int, float | None] = {id(block): None for block in blocks}
        if checked and words:
            gains = word_gains(model, [block.token_ids.tolist() for block in checked], words, self.context)
            for block, row_gains in zip(checked, gains, strict=True):
                out[id(block)] = max(float(row_gains[span].sum()) for span in spans)
        else:
            out.update({id(block): 0.0 for block in checked})
        return [out[id(block)] for block in blocks]

    def rescore(self, model, store: Sequence, scores: torch.Tensor, row: Sequence[int], select):
        """(scores [len(store)] with each candidate's weighted gain added, the blocks not to read for their own score:
        those that are not candidates and those the veto refused) for one prompt row (`scores`: its scorer scores;
        `select(scores, neighbors=, margin=, ...)`: `memory_reader.select_injections` with the read's budget and
        threshold)."""
        cfg = model.config
        candidates = sorted(select(scores, neighbors=0, margin=None), key=lambda i: (-float(scores[i]), -i))
        candidates = candidates[:CHECK_CANDIDATES]
        gains = self.gains(model, row, [store[i] for i in candidates])
        skip = set(range(len(store))) - set(candidates)
        scores = scores.clone()
        for index, gain in zip(candidates, gains, strict=True):
            if gain is None:
                continue
            if cfg.retrieval_likelihood_gain is not None and gain < cfg.retrieval_likelihood_gain:
                skip.add(index)
            elif cfg.retrieval_likelihood_weight is not None:
                scores[index] += cfg.retrieval_likelihood_weight * gain
        return scores, skip

    def choose(self, model, store: Sequence, scores: torch.Tensor, row: Sequence[int], select) -> list[int]:
        """Indices of the blocks one row reads with the check in force (see `rescore`): the margin and neighbours as
        usual, among the candidates, on their new scores."""
        return self.select_rescored(model, *self.rescore(model, store, scores, row, select), select)

    @staticmethod
    def select_rescored(model, scores: torch.Tensor, skip: set[int], select) -> list[int]:
        """The blocks read given `rescore`'s result: the margin and neighbours as usual, the cut already applied."""
        cfg = model.config
        return select(scores, neighbors=cfg.retrieval_neighbors, margin=cfg.retrieval_margin, skip=skip,
                      threshold=None)

    def clear(self) -> None:
        self.view, self.context = None, []


def piece_tokens(text: str, offsets, count: int) -> list[list[int]]:
    """The token indices of each of the user's queries (`user_queries`: the whole text, then each sentence) in the
    tokenization of `text` (`offsets`: its character spans; None, from a slow tokenizer: the whole text only)."""
    whole = list(range(count))
    if offsets is None:
        return [whole]
    spans, start = [whole], 0
    for piece in user_queries(text)[1:]:
        begin = text.find(piece, start)
        if begin < 0:
            begin = text.find(piece)
        end = begin + len(piece)
        spans.append([i for i, (a, b) in enumerate(offsets) if b > a and a >= begin and b <= end])
        start = max(start, begin)
    return [span for span in spans if span]
