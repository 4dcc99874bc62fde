"""The likelihood check (`modeling/memory_check.py`, `config.retrieval_likelihood_gain`): a block the selection takes is
read only when its text makes the user's words more likely to the model."""

import pytest
import torch
from test_read_placement import chat_ids, left_padded
from test_text_read import LEXICAL, PARIS, ROME, ids_of, logits, marker, text_model, tok  # noqa: F401 (fixtures)

from memoryllm_hf.modeling import memory_check
from memoryllm_hf.modeling.memory_check import CHECK_CANDIDATES, LikelihoodCheck, piece_tokens, word_gains
from memoryllm_hf.modeling.memory_lexical import user_queries
from memoryllm_hf.tiny import tiny_tokenizer

CATS = "Cats purr when they are happy."


class FixedGains(LikelihoodCheck):
    """A check whose gains are set per text (by the first token id of the block's text), recording what it checked."""

    def __init__(self, tok, by_text: dict[str, float], default: float = 0.0):
        super().__init__()
        self.by_first = {ids_of(tok, text)[0]: value for text, value in by_text.items()}
        self.default, self.checked = default, []

    def gains(self, model, row, blocks):
        self.checked.append([block.injection for block in blocks])
        return [self.by_first.get(int(block.token_ids[0]), self.default) for block in blocks]


def test_word_gains_equal_a_plain_reference(tok, marker):
    """One padded forward over passages of different lengths gives, per word, log p(word | passage, context) -
    log p(word | context) as separate unpadded forwards of the model without memory do."""
    model = text_model(marker)
    passages = [ids_of(tok, PARIS), ids_of(tok, ROME), ids_of(tok, CATS + " " + PARIS)]
    context, words = ids_of(tok, "\n\n"), ids_of(tok, "Is Rome the capital of France?")

    def logprobs(prefix):
        out = logits(model, [prefix + words], use_memory=False)[0].log_softmax(-1)
        start = len(prefix)
        return torch.stack([out[start + i - 1, word] for i, word in enumerate(words)])

    reference = torch.stack([logprobs(p + context) - logprobs(context) for p in passages])
    got = word_gains(model, passages, words, context)
    assert got.shape == (3, len(words))
    assert (got - reference).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="at least one context token"):
        word_gains(model, passages, words, [])


def test_each_sentence_of_the_user_words_is_a_piece():
    tok = tiny_tokenizer()
    text = "Complete the sentence.\nRome is the capital of"
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = piece_tokens(text, encoded["offset_mapping"], len(encoded["input_ids"]))
    pieces = user_queries(text)
    assert len(spans) == len(pieces) == 3
    assert spans[0] == list(range(len(encoded["input_ids"])))
    for span, piece in zip(spans[1:], pieces[1:], strict=True):
        assert tok.decode([encoded["input_ids"][i] for i in span]).strip() == piece
    assert piece_tokens(text, None, 5) == [list(range(5))]


def test_candidates_below_the_gain_are_not_read(tok, marker):
    model = text_model(marker, retrieval_likelihood_gain=10.0, **{**LEXICAL, "retrieval_margin": None})
    model.inject([PARIS, ROME, CATS], tokenizer=tok)  # injections 1-3: PARIS, 4: ROME, 5-6: CATS
    ids = chat_ids(tok, "Is Rome old? Do cats purr?")
    model.config.retrieval_likelihood_gain = None
    unchecked = model.retrieve(torch.tensor([ids]))[0]
    assert 4 in unchecked and 5 in unchecked
    model.config.retrieval_likelihood_gain = 10.0
    for read in ("text", "retrieve"):
        model.config.read_mode = read
        check = model.reads[read].check = FixedGains(tok, {ROME: 3.0, CATS: 25.0})
        logits(model, [ids])
        assert model.last_retrieval == [[5, 6]]  # Rome's block failed; the cats' text passed (and its neighbour)
        assert len(check.checked) == 1 and 4 in check.checked[0]  # the candidates, in one call
        model.reads[read].check = FixedGains(tok, {ROME: 30.0, CATS: 25.0})
        logits(model, [ids])
        assert model.last_retrieval == [unchecked]


def test_the_rerank_orders_the_candidates_by_score_plus_weighted_gain(tok, marker):
    """With a margin of 0 only the best candidate (and its neighbours) is read: the scorers' best without the rerank,
    the one whose text explains the prompt best with it; a weight of 0 reads what the read without the check reads."""
    cats = "Cats in Rome purr."  # injections 5-6; the prompt scores it below ROME (injection 4)
    model = text_model(marker, **{**LEXICAL, "retrieval_margin": 0.0})
    model.inject([PARIS, ROME, cats], tokenizer=tok)
    ids = torch.tensor([chat_ids(tok, "Is Rome old? Do cats purr?")])
    assert model.retrieve(ids)[0] == [4]
    model.config.retrieval_likelihood_weight = 1.0
    model.reads["retrieve"].check = FixedGains(tok, {cats: 100.0, ROME: 1.0})
    assert model.retrieve(ids)[0] == [5, 6]
    model.reads["retrieve"].check = FixedGains(tok, {cats: -100.0, ROME: 1.0})
    assert model.retrieve(ids)[0] == [4]
    model.config.retrieval_likelihood_weight, model.config.retrieval_margin = 0.0, LEXICAL["retrieval_margin"]
    for question in ("Is Rome old? Do cats purr?", "Which capital is nice?", "Quantum?", "Do cats in Rome purr?"):
        row = torch.tensor([chat_ids(tok, question)])
        model.reads["retrieve"].check = FixedGains(tok, {ROME: 50.0, cats: -3.0, PARIS: 7.0})
        weighted = model.retrieve(row)[0]
        model.config.retrieval_likelihood_weight = None
        assert model.retrieve(row)[0] == weighted
        model.config.retrieval_likelihood_weight = 0.0


@pytest.mark.parametrize("budget", [32, 64, 128])
def test_only_the_best_candidates_that_fit_the_budget_are_checked(tok, marker, budget):
    texts = [f"Rome fact number {i} is old." for i in range(20)]
    model = text_model(marker, long_term_memory_tokens=1024, read_tokens=budget, retrieval_neighbors=0,
                       retrieval_likelihood_gain=10.0, retrieval_scorer="bm25", retrieval_threshold=0.0)
    model.inject(texts, tokenizer=tok)
    check = model.reads["text"].check = FixedGains(tok, {}, default=0.0)
    logits(model, [chat_ids(tok, "Is Rome old?")])
    assert model.last_retrieval == [[]]
    assert len(check.checked) == 1 and len(check.checked[0]) == min(budget // 16, CHECK_CANDIDATES)


def test_batches_equal_rows_with_the_check(tok, marker):
    """Real gains of the tiny model, a cut between them: each row of a left-padded batch reads and predicts what it
    does alone."""
    model = text_model(marker, **{**LEXICAL, "retrieval_margin": None})
    model.inject([PARIS, ROME, CATS], tokenizer=tok)
    rows = [chat_ids(tok, "Is Rome old? Do cats purr?"), chat_ids(tok, "Which capital is nice?", system="Be brief."),
            ids_of(tok, "Rome is"), chat_ids(tok, "Quantum chromodynamics?")]
    check = model.reads["text"].check
    gains = [g for row in rows for g in check.gains(model, row, list(model.long_term_memory))]
    model.config.retrieval_likelihood_gain = sorted(gains)[len(gains) // 2]
    ids, mask = left_padded(rows)
    batch = logits(model, ids.tolist(), attention_mask=mask)
    read = model.last_retrieval
    alone = []
    for index, row in enumerate(rows):
        assert (batch[index, -len(row):] - logits(model, [row])[0]).abs().max() < 1e-5
        alone += model.last_retrieval
    assert read == alone and any(alone[:3]) and alone[3] == []


def test_bad_settings_and_prompts_without_words_get_clear_errors(tok, marker):
    with pytest.raises(ValueError, match="retrieval_likelihood_gain must be a finite number or None"):
        text_model(marker, retrieval_likelihood_gain="high")
    model = text_model(marker, retrieval_likelihood_gain=5.0, **LEXICAL)
    model.config.retrieval_scorer = "model"
    model.inject(ROME, tokenizer=tok)
    embeds = model.get_input_embeddings()(torch.tensor([chat_ids(tok, "Is Rome old?")]))
    with pytest.raises(ValueError, match="the likelihood check .* read the prompt's words: pass input_ids"):
        model.reads["retrieve"].blocks(model, None, None, embeds)


def test_the_gain_is_the_best_sentence_not_the_whole_prompt(tok, marker, monkeypatch):
    """An instruction sentence beside the question adds its own (negative) gains to the whole text only."""
    model = text_model(marker)
    model.inject(ROME, tokenizer=tok)
    text = "Complete the sentence. Rome is"  # (the tiny chat template holds one line per turn)
    row = chat_ids(tok, text)
    words = ids_of(tok, text)
    instruction = len(ids_of(tok, "Complete the sentence."))

    def fake(model_, passages, words_, context):
        assert words_ == words
        return torch.tensor([[-5.0] * instruction + [1.0] * (len(words) - instruction)] * len(passages))

    monkeypatch.setattr(memory_check, "word_gains", fake)
    gain = model.reads["text"].check.gains(model, row, list(model.long_term_memory))
    rome = len(ids_of(tok, " Rome is")) - 1  # the second sentence's tokens (the space is in neither)
    assert words[instruction:][-rome:] == ids_of(tok, " Rome is")[1:]
    assert gain == [float(rome)]  # not the whole text's -5 * instruction + rome + 1
