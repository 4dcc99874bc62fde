"""Tiny random MemoryLlama models for tests, smoke runs and soaks (seconds on a CPU)."""

import torch

from .modeling import MemoryLlamaConfig, MemoryLlamaForCausalLM

TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "num_memory_tokens": 24,
    "num_update_tokens": 6,
    "min_inject_tokens": 2,
    "inject_chunk_size": 16,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_config(**overrides) -> MemoryLlamaConfig:
    """A 2-layer, 32-wide config; any MemoryLlamaConfig field can be overridden."""
    return MemoryLlamaConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MemoryLlamaForCausalLM:
    """A random tiny MemoryLlama in eval mode. Norm weights are jittered around 1 and memory-side vectors are
    non-zero so that wrong positions or masks show up as real numerical differences."""
    torch.manual_seed(seed)
    model = MemoryLlamaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
            elif "memory_embeddings" in name or "adapter_B" in name:
                param.normal_(0.0, 0.05)
    return model


def tiny_tokenizer():
    """A character-level tokenizer (printable ASCII + newline, ids < 100, within the tiny vocabulary; special ids as
    in the tiny config) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(code) for code in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{ch: i + 4 for i, ch in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer
