"""Memory read where the user's message starts (`read_placement="user_turn"`, `modeling/memory_placement.py`)."""

import pytest
import torch

from memoryllm_hf.modeling.memory_placement import marker_split, user_turn_marker
from memoryllm_hf.tiny import tiny_model, tiny_tokenizer

TEXT = "Paris is nice."
RETRIEVE = {"long_term_memory_tokens": 64, "read_mode": "retrieve"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def marker(tok):
    return user_turn_marker(tok)


def chat_ids(tok, content: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    return ids, mask


def placed_model(marker, layers: int = 2, read: dict | None = None, **overrides):
    settings = dict(
        num_hidden_layers=layers, memory_update="input", fresh_pool="grow", num_update_tokens=16,
        read_placement="user_turn", user_turn_marker=marker, **(read or {}),
    )
    return tiny_model(**{**settings, **overrides})


# ---------------------------------------------------------------------- pure parts
def test_marker_is_what_the_template_writes_before_the_users_text(tok, marker):
    assert tok.convert_ids_to_tokens(marker) == ["<s>", "u", "s", "e", "r", ":", " "]
    plain = tiny_tokenizer()
    plain.chat_template = None
    assert user_turn_marker(plain) is None


def test_split_is_after_the_last_user_header_among_real_tokens(tok, marker):
    one = chat_ids(tok, "Hi?")
    two = tok(tok.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "Hi?"}],
        add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    plain = tok("no template here", add_special_tokens=False)["input_ids"]
    ids, mask = left_padded([one, two, plain])
    split = marker_split(ids, mask, marker).tolist()
    assert split[0] == ids.shape[1] - len(one) + len(marker)
    assert split[1] == ids.shape[1] - len(chat_ids(tok, "Hi?")) + len(marker)  # the last user turn
    assert split[2] == 0
    # a marker that lies in the padding is not a header
    padded = torch.cat([torch.tensor([marker]), torch.tensor([plain[: len(marker)]])], 1)
    assert marker_split(padded, torch.tensor([[0] * len(marker) + [1] * len(marker)]), marker).tolist() == [0]


# ---------------------------------------------------------------------- the done-when guarantees
@pytest.mark.parametrize("read", [None, RETRIEVE], ids=["pool", "retrieve"])
def test_one_layer_input_rule_reads_like_the_text_inside_the_user_turn(tok, marker, read):
    """One layer, "input" rule: the slots are the text's token embeddings, so the read equals the text placed
    right after the user header (logits of every prompt token)."""
    model = placed_model(marker, layers=1, read=read)
    with torch.no_grad():
        model.memory_embeddings.new_memory_positional_emb.zero_()
    model.inject(TEXT, tokenizer=tok)
    ids = chat_ids(tok, "Where?", system="Be brief.")
    inside = chat_ids(tok, TEXT + "Where?", system="Be brief.")
    split = int(marker_split(torch.tensor([ids]), None, marker)[0])
    n = len(tok(TEXT, add_special_tokens=False)["input_ids"])
    assert inside[:split] == ids[:split] and inside[split + n :] == ids[split:]
    with torch.no_grad():
        read_logits = model(torch.tensor([ids])).logits[0]
        reference = model(torch.tensor([inside]), use_memory=False).logits[0]
    reference = torch.cat([reference[:split], reference[split + n :]])
    assert (read_logits - reference).abs().max() <= 1e-5
    # the prefix read is something else (the check can fail)
    model.config.read_placement = "prefix"
    with torch.no_grad():
        prefix_logits = model(torch.tensor([ids])).logits[0]
    assert (prefix_logits - reference).abs().max() > 1e-2


@pytest.mark.parametrize("read", [None, RETRIEVE], ids=["pool", "retrieve"])
def test_batches_equal_rows(tok, marker, read):
    """Rows with different headers (a system prompt or not), lengths, and a plain-text row, left-padded: each row's
    logits and greedy generation equal the row's alone."""
    model = placed_model(marker, read=read)
    model.inject(TEXT, tokenizer=tok)
    model.inject("Rome is old and large.", tokenizer=tok)
    rows = [
        chat_ids(tok, "Where?"),
        chat_ids(tok, "Which city is it, again?", system="Answer in one word."),
        tok("Plain text row", add_special_tokens=False)["input_ids"],
    ]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask).logits
        batch_out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for index, row in enumerate(rows):
        with torch.no_grad():
            alone = model(torch.tensor([row])).logits[0]
            alone_out = model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert (batch_logits[index, -len(row) :] - alone).abs().max() < 1e-5
        assert batch_out[index, ids.shape[1] :].tolist() == alone_out[0, len(row) :].tolist()


def test_plain_text_prompts_read_the_prefix_unchanged(tok, marker):
    placed = placed_model(marker)
    prefix = placed_model(marker, read_placement="prefix")
    for model in (placed, prefix):
        model.inject(TEXT, tokenizer=tok)
    ids = torch.tensor([tok("Question: where? Answer:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(placed(ids).logits, prefix(ids).logits)
        assert torch.equal(
            placed.generate(ids, max_new_tokens=5, do_sample=False), prefix.generate(ids, max_new_tokens=5, do_sample=False)
        )
    chat = torch.tensor([chat_ids(tok, "Where?")])
    with torch.no_grad():
        assert not torch.allclose(placed(chat).logits, prefix(chat).logits)


# ---------------------------------------------------------------------- generate paths


@torch.no_grad()
def step_by_step_greedy(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy tokens of a forward loop over the model's cache (one row), to compare with `generate`."""
    step = model(ids)
    tokens = [int(step.logits[0, -1].argmax())]
    cache, seen = step.cache, ids
    for _ in range(new_tokens - 1):
        seen = torch.cat([seen, torch.tensor([[tokens[-1]]])], 1)
        step = model(seen[:, -1:], cache=cache, attention_mask=torch.ones_like(seen))
        cache = step.cache
        tokens.append(int(step.logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("read", [None, RETRIEVE], ids=["pool", "retrieve"])
def test_generate_equals_step_by_step_forward(tok, marker, read):
    """Greedy `generate` = a forward loop over the cache (positions and masks after the prefill)."""
    model = placed_model(marker, read=read)
    model.inject(TEXT, tokenizer=tok)
    ids = torch.tensor([chat_ids(tok, "Where?", system="Be brief.")])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out[0, ids.shape[1] :].tolist() == step_by_step_greedy(model, ids, 6)


def test_static_cache_beams_and_continued_cache(tok, marker):
    model = placed_model(marker)
    model.inject(TEXT, tokenizer=tok)
    ids = torch.tensor([chat_ids(tok, "Where?", system="Be brief.")])
    greedy = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        dynamic = model.generate(ids, output_logits=True, return_dict_in_generate=True, **greedy)
        static = model.generate(ids, cache_implementation="static", output_logits=True, return_dict_in_generate=True,
                                **greedy)
        assert torch.equal(dynamic.sequences, static.sequences)
        assert (torch.stack(dynamic.logits) - torch.stack(static.logits)).abs().max() < 1e-5
        dynamic = dynamic.sequences
        beams = model.generate(ids, num_beams=3, num_return_sequences=2, **greedy)
        assert beams.shape[0] == 2 and torch.equal(beams[0], model.generate(ids, num_beams=3, **greedy)[0])
        first = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        more = model.generate(first.sequences, cache=first.cache, max_new_tokens=2, do_sample=False)
        assert torch.equal(more, dynamic)


def test_shared_prefix_batch_of_one_header(tok, marker):
    """Rows with the same header read one shared, placed memory prefix; equal to rows alone."""
    model = placed_model(marker)
    model.inject(TEXT, tokenizer=tok)
    rows = [chat_ids(tok, "Where?"), chat_ids(tok, "Which one is it?")]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        assert type(model(ids, attention_mask=mask).cache).__name__ == "SharedPrefixCache"
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for index, row in enumerate(rows):
            alone = model.generate(torch.tensor([row]), max_new_tokens=5, do_sample=False)
            assert batch[index, ids.shape[1] :].tolist() == alone[0, len(row) :].tolist()


# ---------------------------------------------------------------------- configuration
def test_config_checks_the_placement_fields(marker):
    with pytest.raises(ValueError, match="read_placement must be one of"):
        tiny_model(read_placement="middle")
    with pytest.raises(ValueError, match="needs user_turn_marker"):
        tiny_model(read_placement="user_turn")
    with pytest.raises(ValueError, match="user_turn_marker must be"):
        tiny_model(read_placement="user_turn", user_turn_marker=[])


def test_from_base_places_reads_for_a_chat_template(tmp_path, tok, marker):
    from transformers import LlamaConfig, LlamaForCausalLM

    from memoryllm_hf.modeling import MemoryLlamaForCausalLM
    from memoryllm_hf.tiny import TINY

    fields = {k: v for k, v in TINY.items() if k in LlamaConfig().to_dict() or k.endswith("_id")}
    base = LlamaForCausalLM(LlamaConfig(**fields))
    chat, plain_folder = tmp_path / "chat", tmp_path / "plain"
    base.save_pretrained(chat)
    base.save_pretrained(plain_folder)
    tok.save_pretrained(chat)
    model = MemoryLlamaForCausalLM.from_base(chat, num_memory_tokens=24, num_update_tokens=6)
    assert model.config.read_placement == "user_turn" and model.config.user_turn_marker == marker
    kept = MemoryLlamaForCausalLM.from_base(chat, read_placement="prefix")
    assert kept.config.read_placement == "prefix" and kept.config.user_turn_marker is None
    plain = tiny_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(plain_folder)
    assert MemoryLlamaForCausalLM.from_base(plain_folder).config.read_placement == "prefix"
    assert MemoryLlamaForCausalLM.from_base(plain_folder, tokenizer=tok).config.user_turn_marker == marker
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        MemoryLlamaForCausalLM.from_base(plain_folder, read_placement="user_turn")


@torch.no_grad()
def test_pipeline_and_streamer_read_in_the_user_turn(tok, marker):
    from transformers import pipeline
    from transformers.generation.streamers import BaseStreamer

    model = placed_model(marker)
    model.inject(TEXT, tokenizer=tok)
    messages = [{"role": "user", "content": "Where?"}]
    ids = torch.tensor([chat_ids(tok, "Where?")])
    expected = model.generate(ids, max_new_tokens=6, do_sample=False)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).clone())

        def end(self):
            pass

    streamer = Collect()
    model.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert torch.equal(torch.cat(streamer.chunks), expected[0])
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    reply = generator(messages, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]["content"]
    assert reply == tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)


def test_cli_ask_reads_in_the_user_turn(capsys, tmp_path, tok, marker):
    """`memoryllm-hf ask` on a folder whose model reads in the user turn answers like the placed read (and not like
    the prefix read)."""
    from memoryllm_hf import cli
    from memoryllm_hf.commands import load_folder
    from memoryllm_hf.greedy import reply

    folder = tmp_path / "model"
    placed_model(marker).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert cli.main(["inject", str(folder), "--text", TEXT]) == 0
    assert cli.main(["ask", str(folder), "Where?", "--max-new-tokens", "6"]) == 0
    answer = capsys.readouterr().out.splitlines()[-1]
    model, tokenizer = load_folder(str(folder))
    assert model.config.read_placement == "user_turn"
    question = [{"role": "user", "content": "Where?"}]
    assert answer == reply(model, tokenizer, question, 6)
    model.config.read_placement = "prefix"
    assert answer != reply(model, tokenizer, question, 6)


def test_a_marker_with_unknown_tokens_is_no_marker():
    """A template whose header the tokenizer cannot spell (unknown tokens) gives no marker: reads keep the prefix."""
    from tiny_folder import tiny_tokenizer as word_tokenizer

    assert user_turn_marker(word_tokenizer()) is None


def test_an_attention_without_masks_is_refused(tok, marker):
    model = placed_model(marker)
    model.inject(TEXT, tokenizer=tok)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash attention cannot take"):
        model(torch.tensor([chat_ids(tok, "Where?")]))
