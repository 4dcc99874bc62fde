"""Numerical parity with the official MemoryLLM code: converted official checkpoints reproduce all golden recordings."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from memoryllm_hf.convert import convert_official
from memoryllm_hf.reference import reference_logits, reference_new_memory_slots

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["official_8b_tiny", "official_7b_tiny"]
TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=CASES)
def golden(request, tmp_path_factory):
    src = FIXTURES / request.param
    model = AutoModelForCausalLM.from_pretrained(convert_official(src, tmp_path_factory.mktemp(request.param))).eval()
    model.config.min_inject_tokens = 1  # the recordings include a 5-token injection
    return request.param, model, load_file(src / "expected.safetensors"), json.loads((src / "inputs.json").read_text())


def test_converted_config(golden):
    name, model, _, _ = golden
    cfg = model.config
    assert (cfg.num_memory_tokens, cfg.num_update_tokens, cfg.memory_update) == (32, 8, "output")
    if name == "official_8b_tiny":
        assert cfg.drop_memory_per_layer and cfg.add_decoder_lora and cfg.positional_emb_on_first_injection
        assert cfg.rope_parameters["rope_type"] == "linear" and cfg.rope_parameters["factor"] == 2.0
    else:
        assert not cfg.drop_memory_per_layer and cfg.lora_config is None and not cfg.positional_emb_on_first_injection
        assert cfg.rope_parameters["factor"] == pytest.approx(40 / 32)


@torch.no_grad()
def test_injection_and_drop(golden):
    _, model, exp, _ = golden
    start = model.memory_state()
    assert max_diff(model.new_memory_slots(exp["inject_ids"]), exp["delta_inject"][0]) < TOL
    model.inject(exp["inject_ids"], generator=torch.Generator().manual_seed(1234))
    assert max_diff(model.memory, exp["memory_after_update"]) < TOL
    kept = exp["drop_kept_indices"]
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(model.memory[layer, :24], start.memory[layer, kept[layer]])
    model.load_memory_state(start)


@torch.no_grad()
def test_read_and_generate(golden):
    _, model, exp, _ = golden
    start = model.memory_state()
    model.inject(exp["inject_ids"], generator=torch.Generator().manual_seed(1234))
    assert max_diff(model(input_ids=exp["query_ids"]).logits, exp["read_logits"]) < TOL
    out = model.generate(
        exp["query_ids"], max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, exp["generate_sequences"])
    assert max_diff(torch.stack(out.logits)[:, 0], exp["generate_step_logits"]) < TOL
    model.load_memory_state(start)


@torch.no_grad()
def test_short_context_and_first_injection(golden):
    _, model, exp, _ = golden
    start = model.memory_state()
    assert max_diff(model.new_memory_slots(exp["short_ids"]), exp["delta_short"][0]) < TOL
    model.reset_memory()
    assert max_diff(model.new_memory_slots(exp["short_ids"]), exp["first_delta"][0]) < TOL
    model.inject(exp["short_ids"])
    assert max_diff(model.memory, exp["first_memory"]) < TOL
    assert max_diff(model(input_ids=exp["query_ids"]).logits, exp["first_read_logits"]) < TOL
    model.load_memory_state(start)


def test_reference_path_matches_golden(golden):
    """The slow reference path (official-style concatenation) reproduces the recordings too."""
    _, model, exp, _ = golden
    start = model.memory_state()
    assert max_diff(reference_new_memory_slots(model, exp["inject_ids"]), exp["delta_inject"][0]) < TOL
    model.inject(exp["inject_ids"], generator=torch.Generator().manual_seed(1234))
    assert max_diff(reference_logits(model, exp["query_ids"]), exp["read_logits"]) < TOL
    model.reset_memory()
    assert max_diff(reference_new_memory_slots(model, exp["short_ids"]), exp["first_delta"][0]) < TOL
    model.load_memory_state(start)
