"""Wrapping a pretrained Llama: the training-free memory reads exactly like in-context text until slots are dropped."""

import pytest
import torch

from memoryllm_hf import MemoryLlamaForCausalLM


@torch.no_grad()
def test_from_base_defaults_and_plain_behaviour(llama_folder):
    folder, llama = llama_folder
    model = MemoryLlamaForCausalLM.from_base(folder, num_memory_tokens=64, num_update_tokens=16).eval()
    cfg = model.config
    assert (cfg.memory_update, cfg.fresh_pool, cfg.inject_chunk_size) == ("input", "grow", 16)
    # what leaves the pool stays findable: a long-term store (about 1 GiB in bfloat16) and retrieval reads
    assert (cfg.read_mode, cfg.long_term_memory_dtype, cfg.read_tokens) == ("retrieve", "bfloat16", 64)
    assert (cfg.retrieval_margin, cfg.retrieval_neighbors) == (None, 1)
    assert cfg.long_term_memory_tokens * cfg.num_hidden_layers * cfg.hidden_size * 2 <= 2**30
    assert (cfg.long_term_memory_tokens + 16) * cfg.num_hidden_layers * cfg.hidden_size * 2 > 2**30
    prompt = torch.randint(3, 128, (2, 6))
    assert torch.allclose(model(prompt).logits, llama(prompt).logits, atol=1e-6)  # empty pool = the base model
    hidden = llama.model(torch.tensor([[cfg.bos_token_id]]), output_hidden_states=True).hidden_states
    bos, _ = model.memory_embeddings()
    assert torch.allclose(bos[:, 0], torch.cat(hidden[: cfg.num_hidden_layers])[:, 0], atol=1e-6)


@torch.no_grad()
def test_memory_equals_in_context_until_slots_are_dropped(llama_folder):
    """Slots hold the hidden states the base model computes for the text, at consecutive positions after bos; while
    every earlier slot fits in the write window (filled <= K) and nothing was dropped, reading memory is reading
    `[BOS] + text` in context."""
    folder, llama = llama_folder
    model = MemoryLlamaForCausalLM.from_base(folder, num_memory_tokens=64, num_update_tokens=32, read_mode="pool").eval()
    chunks = [torch.randint(3, 128, (n,)) for n in (10, 12, 9)]
    for chunk in chunks:
        model.inject(chunk)
    question = torch.randint(3, 128, (1, 5))
    in_context = torch.cat([torch.tensor([model.config.bos_token_id]), *chunks, question[0]])[None]
    expected = llama(in_context).logits[:, -5:]
    assert (model(question).logits - expected).abs().max() < 1e-4
    out = model.generate(question, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, 5:], llama.generate(in_context, max_new_tokens=5, do_sample=False)[:, -5:])


@pytest.mark.slow
def test_gguf_smollm2_answers_from_memory(smollm2):
    model, tokenizer = smollm2
    model.reset_memory()
    model.inject("Zorblat Quenn was born in the town of Velmora in the year 1962.", tokenizer=tokenizer)

    def ask(question, use_memory=True):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, use_memory=use_memory)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    assert "Velmora" in ask("Where was Zorblat Quenn born?")
    assert "Velmora" not in ask("Where was Zorblat Quenn born?", use_memory=False)


@torch.no_grad()
def test_from_base_with_adapters_loads_quietly_and_starts_as_the_base(llama_folder, capsys, caplog):
    """A base checkpoint has no adapters: they start as identity, without a report listing them as missing."""
    folder, llama = llama_folder
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    model = MemoryLlamaForCausalLM.from_base(folder, num_memory_tokens=64, num_update_tokens=16, lora_config=lora)
    printed = capsys.readouterr()
    assert "adapter" not in printed.out + printed.err + caplog.text  # no load report about the adapters
    assert any(".adapter_B." in name for name, _ in model.named_parameters())
    prompt = torch.randint(3, 128, (1, 6))
    assert torch.allclose(model.eval()(prompt).logits, llama(prompt).logits, atol=1e-6)
