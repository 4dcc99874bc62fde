"""The fast path (memory keys/values seeded into the cache, stock Llama layers) equals the official-style
reference path (memory hidden states concatenated to every layer input) for reads and writes."""

import pytest
import torch

from memoryllm_hf.reference import reference_logits, reference_new_memory_slots
from memoryllm_hf.tiny import tiny_model

LORA = {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj"]}
VARIANTS = {
    "official-output-tile": {},
    "input-grow": {"memory_update": "input", "fresh_pool": "grow"},
    "output-grow": {"fresh_pool": "grow"},
    "no-bos": {"add_bos_embedding": False},
    "shared-drops": {"drop_memory_per_layer": False},
    "write-read-adapters": {"lora_config": LORA, "add_decoder_lora": True},
    "one-adapter": {"lora_config": LORA},
}


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_fast_equals_reference(variant):
    model = tiny_model(**VARIANTS[variant])
    question = torch.randint(3, 128, (1, 7))
    assert (model(question).logits - reference_logits(model, question)).abs().max() < 1e-5  # empty pool
    for length in (3, 10, 4, 6, 25):  # shorter and longer than K = 6, first injection included
        context = torch.randint(3, 128, (1, length))
        fast = model.new_memory_slots(context)
        assert (fast - reference_new_memory_slots(model, context)).abs().max() < 1e-5
        model.inject(context, chunk_size=32)
        assert (model(question).logits - reference_logits(model, question)).abs().max() < 1e-5


@torch.no_grad()
def test_adapters_change_what_is_read_and_written():
    """Sanity of the comparison above: the write and read adapters really act (different numbers)."""
    model = tiny_model(lora_config=LORA, add_decoder_lora=True)
    context, question = torch.randint(3, 128, (1, 12)), torch.randint(3, 128, (1, 5))
    slots = model.new_memory_slots(context)
    for module in model.adapters.modules:
        module.adapter_B["write"].zero_()
    assert (model.new_memory_slots(context) - slots).abs().max() > 1e-4
    model.inject(context)
    before = model(question).logits
    for module in model.adapters.modules:
        module.adapter_B["read"].zero_()
    assert (model(question).logits - before).abs().max() > 1e-4
