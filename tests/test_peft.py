"""PEFT on MemoryLlama: LoRA training keeps the memory, wrappers inject and generate, adapters round-trip, the
official write/read design with named adapters, and further fine-tuning of a converted official checkpoint."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from memoryllm_hf.convert import convert_official
from memoryllm_hf.modeling import MemoryLlamaForCausalLM
from memoryllm_hf.peft_utils import add_memory_adapters, load_memory_adapters, train_builtin_memory_parameters
from memoryllm_hf.tiny import tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = Path(__file__).parents[1] / "examples"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
CONTEXT = torch.arange(30, 42)[None]
QUESTION = torch.tensor([[5, 17, 29, 41, 53, 65, 77, 89]])


def memory_model(**overrides) -> MemoryLlamaForCausalLM:
    model = tiny_model(**{"memory_update": "input", "fresh_pool": "grow", **overrides})
    model.inject(torch.arange(3, 15))
    return model


def lora(**overrides) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ATTENTION, **overrides})


def perturb(model, pattern: str, seed: int = 1) -> None:
    """Give LoRA up-projections matching `pattern` random values (fresh LoRA is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if pattern in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def memory_loss(model) -> torch.Tensor:
    """Read loss over freshly written slots: gradients reach both the write and the read path."""
    return model(QUESTION, memory_slots=model.new_memory_slots(CONTEXT), labels=QUESTION).loss


def train(model, params, steps: int = 4, lr: float = 1e-2) -> tuple[float, float]:
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = memory_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses[0], losses[-1]


def assert_same_memory(model, state) -> None:
    for name, tensor in state.as_buffers().items():
        assert torch.equal(getattr(model, name), tensor), name


def test_lora_trains_while_the_memory_stays_a_buffer():
    model = memory_model()
    state = model.memory_state()
    peft_model = get_peft_model(model, lora())
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    assert all(param is not model.memory for param in peft_model.parameters())
    assert any(buffer is model.memory for buffer in peft_model.buffers())
    first, last = train(peft_model, list(trainable.values()))
    assert last < first
    assert_same_memory(model, state)


def test_generate_and_inject_go_through_the_wrapper():
    peft_model = get_peft_model(memory_model(), lora())
    perturb(peft_model, "lora_B")
    merged = copy.deepcopy(peft_model).merge_and_unload()

    greedy = {"max_new_tokens": 5, "do_sample": False}
    generated = peft_model.generate(QUESTION, **greedy)
    assert torch.equal(generated, merged.generate(QUESTION, **greedy))
    assert not torch.equal(generated, peft_model.generate(QUESTION, use_memory=False, **greedy))

    assert peft_model.inject(CONTEXT) == 1 and merged.inject(CONTEXT) == 1
    assert peft_model.num_injections == 2
    torch.testing.assert_close(peft_model.get_base_model().memory, merged.memory)  # written with the LoRA


def test_adapter_with_memory_embeddings_round_trips(tmp_path):
    model = memory_model()
    peft_model = get_peft_model(model, lora(modules_to_save=["memory_embeddings"]))
    trained = peft_model.base_model.model.memory_embeddings.modules_to_save["default"]
    assert model.memory_embeddings() == (trained.bos_embedding, trained.new_memory_positional_emb)
    original = [t.clone() for t in model.memory_embeddings.original_module()]

    loss = memory_loss(peft_model)
    loss.backward()
    assert trained.bos_embedding.grad.abs().sum() > 0 and trained.new_memory_positional_emb.grad.abs().sum() > 0
    train(peft_model, [p for p in peft_model.parameters() if p.requires_grad])
    assert not torch.equal(trained.bos_embedding, original[0])
    assert torch.equal(model.memory_embeddings.original_module.bos_embedding, original[0])
    peft_model.save_pretrained(tmp_path)

    base = memory_model()
    base.load_memory_state(model.memory_state())
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(QUESTION).logits, peft_model(QUESTION).logits, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.new_memory_slots(CONTEXT), peft_model.new_memory_slots(CONTEXT))
    assert_same_memory(base, model.memory_state())


def test_merge_and_unload_keeps_memory_and_outputs():
    model = memory_model()
    state = model.memory_state()
    peft_model = get_peft_model(model, lora(modules_to_save=["memory_embeddings"]))
    perturb(peft_model, "lora_B")
    with torch.no_grad():
        expected = peft_model(QUESTION).logits
        merged = peft_model.merge_and_unload()
        assert isinstance(merged, MemoryLlamaForCausalLM)
        torch.testing.assert_close(merged(QUESTION).logits, expected)
    assert_same_memory(merged, state)


def test_named_write_and_read_adapters_serve_their_roles(tmp_path):
    model = memory_model(memory_update="output")  # the official rule: every write LoRA shapes the new slots
    peft_model = add_memory_adapters(model, lora())
    with torch.no_grad():
        slots, plain = peft_model.new_memory_slots(CONTEXT), peft_model(QUESTION, use_memory=False).logits
        perturb(peft_model, "lora_B.write")
        written = peft_model.new_memory_slots(CONTEXT)
        assert not torch.allclose(written, slots)
        torch.testing.assert_close(peft_model(QUESTION, use_memory=False).logits, plain)
        perturb(peft_model, "lora_B.read", seed=2)
        torch.testing.assert_close(peft_model.new_memory_slots(CONTEXT), written)
        assert not torch.allclose(peft_model(QUESTION, use_memory=False).logits, plain)

    memory_loss(peft_model).backward()
    for role in ("write", "read"):
        grads = [p.grad for n, p in peft_model.named_parameters() if f"lora_A.{role}." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), role
    peft_model.zero_grad()

    peft_model.save_pretrained(tmp_path)
    reloaded = load_memory_adapters(memory_model(memory_update="output"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.new_memory_slots(CONTEXT), written)
        torch.testing.assert_close(reloaded(QUESTION).logits, peft_model(QUESTION).logits)
    assert reloaded.inject(CONTEXT) == 1 and peft_model.inject(CONTEXT) == 1
    torch.testing.assert_close(reloaded.get_base_model().memory, model.memory)


@pytest.fixture(scope="module")
def converted_8b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official-8b")
    convert_official(FIXTURES / "official_8b_tiny", folder)
    return folder


def test_converted_official_checkpoint_trains_its_builtin_adapters(converted_8b):
    model = MemoryLlamaForCausalLM.from_pretrained(converted_8b).eval()
    state, frozen = model.memory_state(), model.model.layers[0].self_attn.q_proj.weight.clone()
    params = train_builtin_memory_parameters(model)
    assert params and all(p.requires_grad for p in params)
    first, last = train(model, params)
    assert last < first
    assert_same_memory(model, state)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, frozen)


def test_converted_official_checkpoint_takes_peft_lora_on_top(converted_8b):
    model = MemoryLlamaForCausalLM.from_pretrained(converted_8b).eval()
    state = model.memory_state()
    builtin = {n: p.clone() for n, p in model.named_parameters() if ".adapter_" in n}
    peft_model = get_peft_model(model, lora(target_modules=["q_proj", "v_proj", "o_proj"]))
    first, last = train(peft_model, [p for p in peft_model.parameters() if p.requires_grad])
    assert last < first
    assert_same_memory(model, state)
    assert all(torch.equal(p, builtin[n]) for n, p in model.named_parameters() if n in builtin)


def test_builtin_training_needs_builtin_adapters():
    with pytest.raises(ValueError, match="no built-in memory adapters"):
        train_builtin_memory_parameters(memory_model())


def test_finetune_example_lowers_the_loss_and_saves_the_adapter(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("peft_finetune", EXAMPLES / "peft_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": "the cat sat on the mat. " * 6}) + "\n" for _ in range(12)))
    args = ["--tiny", "--data", str(data), "--steps", "8", "--held-out", "2", "--output", str(tmp_path / "out")]
    assert example.main(args + ["--context-tokens", "24", "--target-tokens", "24"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("held-out loss")]
    losses = [float(line.split(":")[1].split()[0]) for line in lines]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
