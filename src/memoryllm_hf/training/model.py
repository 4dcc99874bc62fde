"""The model that trains: a MemoryLlama with write/read adapters, its base frozen."""

import torch
from torch import nn

from ..modeling import MemoryLlamaForCausalLM
from ..peft_utils import train_builtin_memory_parameters
from ..sources import load_base
from .config import ModelConfig


def build_model(config: ModelConfig) -> tuple[MemoryLlamaForCausalLM, object | None]:
    """(model, tokenizer) for `config.base`: "tiny" (with the character-level tiny tokenizer), "smollm2", or a
    Llama / MemoryLlama folder. Fresh adapters start as identity (B = 0)."""
    if not config.lora:
        raise ValueError("model.lora is empty: training needs the write/read adapters (r, lora_alpha, target_modules)")
    memory = {
        "read_mode": "pool",  # training optimises the pool read: no long-term store (unless the config asks)
        **config.memory,
        "memory_update": config.memory_update,
        "lora_config": config.lora,
        "add_decoder_lora": config.add_decoder_lora,
    }
    model, tokenizer = load_base(config.base, seed=config.seed, **memory)
    if config.base == "tiny":
        for module in model.adapters.modules:  # fresh adapters change nothing, as after `from_base`
            module.adapter_A.reset()
            module.adapter_B.reset()
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(config.tiny_embedding_scale)
    return model, tokenizer


def mark_trainable(model: MemoryLlamaForCausalLM, train_memory_embeddings: bool) -> list[nn.Parameter]:
    """Freeze the base; train the adapters and (optionally) `bos_embedding` / `new_memory_positional_emb`."""
    return train_builtin_memory_parameters(model, train_memory_embeddings)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what a checkpoint or an exported adapter holds)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
