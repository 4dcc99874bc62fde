"""The subject gate (`modeling/memory_subject.py`, `config.retrieval_subject_gate`): a block is not read for its own
score when the user's words name subjects it never mentions."""

import pytest
import torch
from test_read_placement import chat_ids, left_padded
from test_text_read import marker, text_model, tok  # noqa: F401 (fixtures)

from memoryllm_hf.modeling.memory_lexical import Analyzer
from memoryllm_hf.modeling.memory_subject import names_elsewhere, subject_terms

EDIT = "The mother tongue of Danielle Darrieux is English."
OTHER = "The mother tongue of Michel Rocard is French."


@pytest.fixture(scope="module")
def analyzer():
    return Analyzer()


def test_subject_terms_are_capitalised_words_past_a_sentences_start(analyzer):
    assert subject_terms(analyzer, "The mother tongue of Danielle Darrieux is") == {"daniell", "darrieux"}
    assert subject_terms(analyzer, "Michel Rocard is a native speaker of") == {"rocard"}
    assert subject_terms(analyzer, "who sang the song that never ends") == set()
    assert subject_terms(analyzer, "Describe the process. Then tell me more.") == set()
    assert subject_terms(analyzer, 'He said: "Where is it?" What about The Who') == set()  # stop words
    assert subject_terms(analyzer, "Where on Earth is free oxygen found?") == {"earth"}


def test_a_block_is_refused_when_the_user_names_subjects_and_it_shares_none(analyzer):
    assert names_elsewhere(analyzer, "Michel Rocard is a native speaker of", EDIT)
    assert not names_elsewhere(analyzer, "The mother tongue of Danielle Darrieux is", EDIT)
    assert not names_elsewhere(analyzer, "Where DARRIEUX is from, people speak", EDIT)  # case-folded terms
    assert not names_elsewhere(analyzer, "what language did she speak", EDIT)  # names nothing
    # an instruction beside the prompt names nothing; one subject of all those named is enough
    assert names_elsewhere(analyzer, "Complete the sentence.\nMichel Rocard is a native speaker of", EDIT)
    assert not names_elsewhere(analyzer, "Ask about Michel Rocard. Or about Danielle Darrieux?", EDIT)
    assert not names_elsewhere(analyzer, "", EDIT)


def test_dotted_acronyms_and_typos_of_long_names_still_find_their_block(analyzer):
    block = "A U.N. secretary-general studied at the Kennedy School. The Premier League began in 1992."
    assert subject_terms(analyzer, "What did the U.S. Navy do?") == {"us", "navi"}
    assert not names_elsewhere(analyzer, "What UN secretary went there?", block)  # "U.N." is "UN"
    assert not names_elsewhere(analyzer, "Who studied at the U.N. school?", block)
    assert not names_elsewhere(analyzer, "When did the Primier league begin?", block)  # one letter changed
    assert not names_elsewhere(analyzer, "Who went to the Kenedy school?", block)  # one left out
    assert not names_elsewhere(analyzer, "Who went to the Kennnedy school?", block)  # one added
    assert not names_elsewhere(analyzer, "Who went to the Knenedy school?", block)  # two swapped
    # two edits, or one edit in a short name, is another name
    assert names_elsewhere(analyzer, "Who went to the Kenneth school?", block)
    assert names_elsewhere(analyzer, "What is the ONU?", block)
    assert names_elsewhere(analyzer, "When did Rio begin?", block)
    assert names_elsewhere(analyzer, "Michel Rocard is a native speaker of", EDIT)


@torch.no_grad()
@pytest.mark.parametrize("read", ["text", "retrieve"])
def test_the_gate_keeps_a_named_subjects_prompt_off_another_subjects_fact(tok, marker, read):
    """Two stored facts of one relation: without the gate a prompt about one subject also reads the other's fact
    (they share the phrasing); with it, each reads only its own; a prompt naming nothing is not gated; a batch
    equals its rows."""
    model = text_model(marker, read_mode=read, retrieval_neighbors=0, read_tokens=256, retrieval_scorer="bm25",
                       retrieval_threshold=0.05, retrieval_margin=None)
    model.inject([EDIT, OTHER, "Cats purr when they are happy."], tokenizer=tok)
    # (the tiny model writes 16 tokens an update: a text is several blocks; `call` names the text of each)
    text_of = {block.injection: block.call for block in model.long_term_memory}
    edit, other = text_of[1], max(text_of.values()) - 3

    def texts(rows):
        return [sorted({text_of[injection] for injection in row}) for row in rows]

    prompts = [chat_ids(tok, "The mother tongue of Danielle Darrieux is"),
               chat_ids(tok, "Is the mother tongue of Michel Rocard French?"),
               chat_ids(tok, "what is the mother tongue")]
    plain = [model.retrieve(torch.tensor([ids]))[0] for ids in prompts]
    assert texts(plain) == [[edit, other]] * 3
    model.config.retrieval_subject_gate = True
    gated = [model.retrieve(torch.tensor([ids]))[0] for ids in prompts]
    assert texts(gated) == [[edit], [other], [edit, other]]
    # every block of the subject's text stays (also those that do not hold the name themselves)
    assert gated[0] == [i for i in plain[0] if text_of[i] == edit] and len(gated[0]) > 1
    assert gated[1] == [i for i in plain[1] if text_of[i] == other] and len(gated[1]) > 1
    assert gated[2] == plain[2]
    ids, mask = left_padded(prompts)
    model(ids, attention_mask=mask)
    assert model.last_retrieval == gated
    model.config.retrieval_scorer = "model"  # (a scorer that reads embeddings; the gate still needs the words)
    with pytest.raises(ValueError, match="retrieval_subject_gate"):
        model.retrieve(inputs_embeds=model.get_input_embeddings()(torch.tensor([prompts[0]])))


def test_the_gate_setting_is_checked(marker):
    with pytest.raises(ValueError, match="retrieval_subject_gate must be True or False"):
        text_model(marker, retrieval_subject_gate="yes")


def test_a_model_with_the_gate_and_a_lexical_scorer_deep_copies_and_pickles(tok, marker):
    """(the analyzer's stemmer is a C object: a copy builds a new analyzer of the same language)"""
    import copy
    import pickle

    model = text_model(marker, retrieval_scorer="bm25", retrieval_subject_gate=True)
    model.inject(EDIT, tokenizer=tok)
    ids = chat_ids(tok, "The mother tongue of Danielle Darrieux is")
    model.retrieve(torch.tensor([ids]))  # (the lexical part and the gate hold their analyzers now)
    twin = copy.deepcopy(model)
    assert twin.retrieve(torch.tensor([ids])) == model.retrieve(torch.tensor([ids]))
    analyzer = pickle.loads(pickle.dumps(Analyzer("english")))
    assert analyzer.terms("The Surnames") == ["surnam"]
