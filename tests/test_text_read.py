"""The text read (`read_mode="text"`, `modeling/memory_text_read.py`): the stored tokens of the retrieved blocks, read
as the passage written at the start of the user's message (or before a plain-text prompt)."""

import pytest
import torch
from test_read_placement import chat_ids, left_padded, step_by_step_greedy

from memoryllm_hf.modeling import MemoryLlamaForCausalLM
from memoryllm_hf.modeling.memory_scoring import RETRIEVAL_SCORERS
from memoryllm_hf.modeling.memory_placement import marker_split, user_turn_marker
from memoryllm_hf.tiny import tiny_model, tiny_tokenizer

PARIS = "Paris is the capital of France and a nice city."  # 48 characters: three chunks of 16
ROME = "Rome is old."
BM25 = RETRIEVAL_SCORERS["bm25"]
LEXICAL = {"retrieval_scorer": "bm25", "retrieval_threshold": BM25.threshold, "retrieval_margin": BM25.margin}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def marker(tok):
    return user_turn_marker(tok)


def text_model(marker, layers: int = 3, **overrides):
    settings = dict(
        num_hidden_layers=layers, memory_update="input", fresh_pool="grow", num_update_tokens=16,
        long_term_memory_tokens=256, read_tokens=64, retrieval_neighbors=2, read_mode="text",
        read_placement="user_turn", user_turn_marker=marker,
    )
    return tiny_model(**{**settings, **overrides})


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def logits(model, rows, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(rows), **kwargs).logits


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("system", [None, "Be brief."], ids=["no-system", "system"])
def test_reads_like_the_passage_at_the_start_of_the_user_turn(tok, marker, system):
    """A 3-layer model whose store holds two texts (one of three chunks): the prompt's logits equal those of the same
    prompt with both texts, each followed by the separator (a blank line), written at the start of the user's
    message."""
    model = text_model(marker)
    model.inject([PARIS, ROME], tokenizer=tok)
    assert len(model.long_term_memory) == 4
    passage = PARIS + "\n\n" + ROME + "\n\n"  # a text's chunks are joined as they were cut
    ids = chat_ids(tok, "Where?", system=system)
    inside = chat_ids(tok, passage + "Where?", system=system)
    split, n = int(marker_split(torch.tensor([ids]), None, marker)[0]), len(ids_of(tok, passage))
    assert inside[:split] == ids[:split] and inside[split + n :] == ids[split:]
    reference = logits(model, [inside], use_memory=False)[0]
    reference = torch.cat([reference[:split], reference[split + n :]])
    assert (logits(model, [ids])[0] - reference).abs().max() <= 1e-5
    assert model.last_retrieval == [[1, 2, 3, 4]]
    # the retrieval read of the same blocks' slots is something else (the check can fail)
    model.config.read_mode = "retrieve"
    assert (logits(model, [ids])[0] - reference).abs().max() > 1e-2


def test_a_plain_text_prompt_reads_the_passage_before_it(tok, marker):
    plain = ids_of(tok, "Question: where? Answer:")
    for placement in ("user_turn", "prefix"):
        model = text_model(marker, read_placement=placement)
        model.inject(PARIS, tokenizer=tok)
        passage = ids_of(tok, PARIS + "\n\n")
        reference = logits(model, [passage + plain], use_memory=False)[0, len(passage) :]
        assert (logits(model, [plain])[0] - reference).abs().max() <= 1e-5


def test_a_chat_prompt_with_prefix_placement_reads_the_passage_before_the_template(tok, marker):
    model = text_model(marker, read_placement="prefix")
    model.inject(PARIS, tokenizer=tok)
    ids, passage = chat_ids(tok, "Where?"), ids_of(tok, PARIS + "\n\n")
    reference = logits(model, [passage + ids], use_memory=False)[0, len(passage) :]
    assert (logits(model, [ids])[0] - reference).abs().max() <= 1e-5


# ---------------------------------------------------------------------- what is read
def test_an_unrelated_prompt_reads_nothing(tok, marker):
    """With a relevance cut, a prompt that matches no stored word reads nothing: the plain base model."""
    model = text_model(marker, **LEXICAL)
    model.inject(PARIS, tokenizer=tok)
    for ids in (chat_ids(tok, "Quantum chromodynamics?"), ids_of(tok, "Quantum chromodynamics")):
        assert (logits(model, [ids]) - logits(model, [ids], use_memory=False)).abs().max() == 0
        assert model.last_retrieval == [[]]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
            static = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                                    cache_implementation="static")
            plain = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, use_memory=False)
        assert torch.equal(out, plain) and torch.equal(static, plain)
    ids = chat_ids(tok, "Which capital is nice?")
    assert (logits(model, [ids]) - logits(model, [ids], use_memory=False)).abs().max() > 1e-3
    assert model.last_retrieval == [[1, 2, 3]]


def test_it_reads_the_blocks_the_retrieval_read_chooses(tok, marker):
    model = text_model(marker, **LEXICAL)
    model.inject([PARIS, ROME, "Cats purr when they are happy."], tokenizer=tok)
    rows = [chat_ids(tok, "Is Rome old?"), chat_ids(tok, "Do cats purr?"), chat_ids(tok, "Quantum?")]
    ids, mask = left_padded(rows)
    expected = model.retrieve(ids, mask)
    logits(model, ids.tolist(), attention_mask=mask)
    assert model.last_retrieval == expected == [[4], [5, 6], []]


def test_a_store_without_token_ids_is_refused(tok, marker):
    model = text_model(marker)
    model.commit_memory_slots(model.new_memory_slots(torch.tensor([ids_of(tok, PARIS)[:16]])))
    assert model.long_term_memory[0].token_ids is None
    before = model.memory_state()
    with pytest.raises(ValueError, match="stored without them.*inject its text again, or use read_mode='retrieve'"):
        logits(model, [chat_ids(tok, "Where?")])
    assert torch.equal(model.memory, before.memory) and len(model.long_term_memory) == 1


def test_config_needs_a_long_term_store(marker):
    with pytest.raises(ValueError, match="read_mode='text' reads the token ids kept by the long-term store: set "
                                         "long_term_memory_tokens > 0"):
        tiny_model(read_mode="text")


# ---------------------------------------------------------------------- batches and generate paths
def test_batches_equal_rows(tok, marker):
    """Left-padded rows with and without a system prompt, a plain-text row and a row that reads nothing: each row's
    logits and greedy generation equal the row's alone."""
    model = text_model(marker, **LEXICAL)
    model.inject([PARIS, ROME], tokenizer=tok)
    rows = [
        chat_ids(tok, "Which capital is nice?"),
        chat_ids(tok, "Is Rome old?", system="Answer in one word."),
        ids_of(tok, "Rome is"),
        chat_ids(tok, "Quantum chromodynamics?", system="Be brief."),
    ]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        read = model.last_retrieval
        batch_out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert read == [[1, 2, 3], [4], [4], []]
    for index, row in enumerate(rows):
        with torch.no_grad():
            alone = model(torch.tensor([row])).logits[0]
            alone_out = model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert (batch_logits[index, -len(row) :] - alone).abs().max() < 1e-5
        assert batch_out[index, ids.shape[1] :].tolist() == alone_out[0, len(row) :].tolist()
    assert (batch_logits[3, -len(rows[3]) :] - logits(model, [rows[3]], use_memory=False)[0]).abs().max() < 1e-5


def test_generate_equals_step_by_step_forward(tok, marker):
    model = text_model(marker)
    model.inject(PARIS, tokenizer=tok)
    ids = torch.tensor([chat_ids(tok, "Where?", system="Be brief.")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == step_by_step_greedy(model, ids, 6)


def test_static_cache_and_beams(tok, marker):
    model = text_model(marker)
    model.inject(PARIS, tokenizer=tok)
    ids = torch.tensor([chat_ids(tok, "Where?", system="Be brief.")])
    greedy = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(ids, **greedy)
        static = model.generate(ids, cache_implementation="static", **greedy)
        assert torch.equal(dynamic.sequences, static.sequences)
        assert (torch.stack(dynamic.logits) - torch.stack(static.logits)).abs().max() < 1e-5
        beams = model.generate(ids, num_beams=3, num_return_sequences=2, max_new_tokens=5, do_sample=False)
        alone = model.generate(ids, num_beams=3, max_new_tokens=5, do_sample=False)
    assert beams.shape[0] == 2 and torch.equal(beams[0], alone[0])


@torch.no_grad()
def test_pipeline(tok, marker):
    from transformers import pipeline

    model = text_model(marker)
    model.inject(PARIS, tokenizer=tok)
    ids = torch.tensor([chat_ids(tok, "Where?")])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    reply = generator([{"role": "user", "content": "Where?"}], max_new_tokens=6, do_sample=False)
    answer = tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)
    assert reply[0]["generated_text"][-1]["content"] == answer


# ---------------------------------------------------------------------- save / load, from_base, command line
def test_save_load_keeps_the_read_mode_and_what_it_reads(tmp_path, tok, marker):
    model = text_model(marker)
    model.inject([PARIS, ROME], tokenizer=tok)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = MemoryLlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.read_mode == "text"
    ids = [chat_ids(tok, "Where?")]
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_from_base_gives_the_text_read_the_retrieval_defaults(tmp_path, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    from memoryllm_hf.tiny import TINY

    fields = {k: v for k, v in TINY.items() if k in LlamaConfig().to_dict() or k.endswith("_id")}
    LlamaForCausalLM(LlamaConfig(**fields)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = MemoryLlamaForCausalLM.from_base(tmp_path / "base", read_mode="text", num_memory_tokens=64,
                                             num_update_tokens=16)
    retrieve = MemoryLlamaForCausalLM.from_base(tmp_path / "base", num_memory_tokens=64, num_update_tokens=16)
    names = ("read_tokens", "retrieval_neighbors", "long_term_memory_tokens", "retrieval_scorer",
             "retrieval_threshold", "retrieval_margin", "read_placement")
    assert model.config.read_mode == "text"
    assert [getattr(model.config, n) for n in names] == [getattr(retrieve.config, n) for n in names]
    from memoryllm_hf.modeling.memory_scoring import DEFAULT_SCORERS

    assert model.config.retrieval_scorer in DEFAULT_SCORERS  # (an encoder's when it is installed)
    assert model.config.read_placement == "user_turn"


def test_cli_ask_with_read_mode_text(capsys, tmp_path, tok, marker):
    from memoryllm_hf import cli
    from memoryllm_hf.commands import load_folder
    from memoryllm_hf.greedy import reply

    folder = tmp_path / "model"
    text_model(marker, read_mode="retrieve").save_pretrained(folder)
    tok.save_pretrained(folder)
    assert cli.main(["inject", str(folder), "--text", PARIS]) == 0
    assert cli.main(["ask", str(folder), "Where?", "--max-new-tokens", "6", "--read-mode", "text"]) == 0
    answer = capsys.readouterr().out.splitlines()[-1]
    model, tokenizer = load_folder(str(folder), read_mode="text")
    assert model.config.read_mode == "text"
    question = [{"role": "user", "content": "Where?"}]
    assert answer == reply(model, tokenizer, question, 6)
    model.config.read_mode = "retrieve"
    assert answer != reply(model, tokenizer, question, 6)


def test_longest_prefix_bounds_what_is_read(tok, marker):
    """The window warning's bound, known before any compute, is never below what a read takes."""
    model = text_model(marker, read_placement="prefix")
    model.inject([PARIS, ROME, "Cats purr."], tokenizer=tok)
    bound = model.reads["text"].longest_prefix(model)
    with torch.no_grad():
        out = model(torch.tensor([ids_of(tok, "Where?")]))
    read = out.cache.get_seq_length() - len(ids_of(tok, "Where?"))
    assert 0 < read <= bound


def test_the_separator_is_tokenized_as_it_is_before_a_word():
    """A byte-level BPE writes a blank line at the end of a text as one token and before a word as two (SmolLM2:
    "ĊĊ" vs "Ċ", "Ċ"): the read uses the ids a passage followed by the user's words has in the prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from memoryllm_hf.modeling.memory_lexical import separator_ids

    vocab = {"Ċ": 0, "ĊĊ": 1, "T": 2, "h": 3, "e": 4, "Th": 5, "The": 6, "x": 7}
    backend = Tokenizer(models.BPE(vocab, [("Ċ", "Ċ"), ("T", "h"), ("Th", "e")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert bpe("\n\n", add_special_tokens=False)["input_ids"] == [1]
    assert bpe("x\n\nThe", add_special_tokens=False)["input_ids"] == [7, 0, 0, 6]
    assert separator_ids(bpe) == [0, 0]
    assert separator_ids(tiny_tokenizer()) == ids_of(tiny_tokenizer(), "\n\n")
