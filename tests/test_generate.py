"""Reads through `forward` and standard `generate()`: caches, decoding strategies, batching, memory K/V reuse."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, pipeline
from transformers.generation.streamers import BaseStreamer

import memoryllm_hf.modeling.memory_prefix as memory_prefix
from memoryllm_hf.tiny import tiny_tokenizer


@pytest.fixture
def model(read_model):
    return read_model


@torch.no_grad()
def test_cached_generation_equals_recomputation(model):
    prompt = torch.randint(3, 128, (1, 5))
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequence = prompt
    for step, step_logits in enumerate(out.logits):
        logits = model(sequence).logits[:, -1]  # no cache: memory prefix + whole sequence recomputed
        assert (logits - step_logits).abs().max() < 1e-5
        sequence = torch.cat([sequence, out.sequences[:, prompt.shape[1] + step][:, None]], dim=1)
    assert torch.equal(sequence, out.sequences)


@torch.no_grad()
def test_memory_changes_the_output(model):
    prompt = torch.randint(3, 128, (1, 6))
    assert (model(prompt).logits - model(prompt, use_memory=False).logits).abs().max() > 1e-3


@torch.no_grad()
def test_without_memory_equals_plain_llama(model):
    llama_config = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if k in LlamaConfig().to_dict()})
    llama = LlamaForCausalLM(llama_config).eval()
    llama.load_state_dict(model.state_dict(), strict=False)
    prompt = torch.randint(3, 128, (2, 6))
    assert torch.allclose(model(prompt, use_memory=False).logits, llama(prompt).logits, atol=1e-6)
    assert torch.equal(
        model.generate(prompt, max_new_tokens=5, do_sample=False, use_memory=False),
        llama.generate(prompt, max_new_tokens=5, do_sample=False),
    )


@torch.no_grad()
def test_left_padded_batch_equals_unbatched_rows(model):
    rows = [torch.randint(3, 128, (n,)) for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    pad = model.config.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in rows])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    logits = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        single = model.generate(row[None], max_new_tokens=6, do_sample=False)
        assert torch.equal(batched[i, width:], single[0, len(row) :])
        assert (logits[i, -1] - model(row[None]).logits[0, -1]).abs().max() < 1e-5


@torch.no_grad()
def test_decoding_strategies(model):
    prompt = torch.randint(3, 128, (2, 4))
    torch.manual_seed(3)
    sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=3)
    torch.manual_seed(3)
    again = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, num_return_sequences=3)
    assert torch.equal(sampled, again)
    assert sampled.shape == (6, 9)
    beams = model.generate(
        prompt,
        max_new_tokens=5,
        num_beams=4,
        num_return_sequences=2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert beams.sequences.shape == (4, 9)
    # the best beam scores at least as well as greedy under the model (length-normalised log-probs)
    greedy = model.generate(prompt[:1], max_new_tokens=5, do_sample=False)

    def logprob(seq):
        logp = model(seq[:, :-1]).logits.log_softmax(-1)
        return logp[0, 3:].gather(-1, seq[0, 4:, None]).sum()

    assert logprob(beams.sequences[:1]) >= logprob(greedy) - 1e-4


@torch.no_grad()
def test_streamer_and_pipeline(model):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    streamer = Collect()
    prompt = torch.randint(3, 128, (1, 4))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, streamer=streamer)
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[:-1]])
    assert torch.equal(streamed, out[0]) and streamer.chunks[-1] is None

    tokenizer = tiny_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("The sky is", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    ids = tokenizer("The sky is", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0])
    assert text == expected and text.startswith("The sky is")


@torch.no_grad()
def test_memory_keys_values_are_reused_until_the_memory_changes(model, monkeypatch):
    calls = []
    original = memory_prefix.prefix_key_values
    for reader in ("memory_pool_read", "memory_writer"):  # the read's prefix and the write window's
        monkeypatch.setattr(
            f"memoryllm_hf.modeling.{reader}.prefix_key_values",
            lambda *a, **k: calls.append(1) or original(*a, **k),
        )
    prompt = torch.randint(3, 128, (1, 4))
    first = model.generate(prompt, max_new_tokens=3, do_sample=False)
    for _ in range(3):
        assert torch.equal(model.generate(prompt, max_new_tokens=3, do_sample=False), first)
        model(prompt)
    assert len(calls) == 1
    model.inject(torch.randint(3, 128, (12,)))  # memory changed: recomputed once, then reused again
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    model.generate(prompt, max_new_tokens=3, do_sample=False)
    calls_after_inject = len(calls)
    assert calls_after_inject == 2 + 1  # + the write window of the injection itself
    model.model.layers[0].self_attn.k_proj.weight.mul_(1.01)  # weights changed in place: recomputed
    model(prompt)
    assert len(calls) == calls_after_inject + 1
