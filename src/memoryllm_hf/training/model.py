"""The model that trains: a MemoryLlama with write/read adapters, its base frozen."""

import torch
from torch import nn

from ..modeling import MemoryLlamaForCausalLM
from ..peft_utils import train_builtin_memory_parameters
from .config import ModelConfig


def build_model(config: ModelConfig) -> tuple[MemoryLlamaForCausalLM, object | None]:
    """(model, tokenizer) for `config.base`: "tiny" (with the character-level tiny tokenizer), "smollm2", or a
    Llama / MemoryLlama folder. Fresh adapters start as identity (B = 0)."""
    if not config.lora:
        raise ValueError("model.lora is empty: training needs the write/read adapters (r, lora_alpha, target_modules)")
    memory = {
        **config.memory,
        "memory_update": config.memory_update,
        "lora_config": config.lora,
        "add_decoder_lora": config.add_decoder_lora,
    }
    if config.base == "tiny":
        from ..tiny import tiny_model, tiny_tokenizer

        model = tiny_model(seed=config.seed, **memory)
        for module in model.adapters.modules:  # fresh adapters change nothing, as after `from_base`
            module.adapter_A.reset()
            module.adapter_B.reset()
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(config.tiny_embedding_scale)
        return model, tiny_tokenizer()
    from transformers import AutoConfig, AutoTokenizer

    if config.base == "smollm2":
        from ..default_model import smollm2_base_folder

        folder = str(smollm2_base_folder())
    else:
        folder = config.base
    if AutoConfig.from_pretrained(folder).model_type == "llama":
        # training optimises the pool read: no long-term store, no retrieval (unless the config asks)
        model = MemoryLlamaForCausalLM.from_base(folder, **{"read_mode": "pool", **memory})
    else:
        model = MemoryLlamaForCausalLM.from_pretrained(folder, **memory)
    return model, AutoTokenizer.from_pretrained(folder)


def mark_trainable(model: MemoryLlamaForCausalLM, train_memory_embeddings: bool) -> list[nn.Parameter]:
    """Freeze the base; train the adapters and (optionally) `bos_embedding` / `new_memory_positional_emb`."""
    return train_builtin_memory_parameters(model, train_memory_embeddings)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what a checkpoint or an exported adapter holds)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
