"""Greedy answers: the one place that turns prompts (token ids, or a conversation) into greedy continuations, for
the chat, the demo, the evaluation harness and training's before/after check."""

from collections.abc import Sequence

import torch
from transformers import GenerationConfig


def greedy_config(tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Explicit greedy decoding (a checkpoint's generation_config may sample; we never do so silently)."""
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


@torch.no_grad()
def generate(
    model, tokenizer, prompts: Sequence[Sequence[int]], use_memory: bool, config: GenerationConfig
) -> list[str]:
    """Greedy continuations of prompts generated as one left-padded batch, decoded without special tokens."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[row, width - len(prompt) :] = 1
    output = model.generate(
        ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config, use_memory=use_memory
    )
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation (`[{"role": ..., "content": ...}]`) ready for the answer: the chat template with
    the generation prompt, or the contents joined by newlines for a tokenizer without a template."""
    if tokenizer.chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])
    return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]


def reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 128, use_memory: bool = True) -> str:
    """Greedy answer to a conversation, read with (or without) the model's memory."""
    config = greedy_config(tokenizer, max_new_tokens)
    return generate(model, tokenizer, [prompt_ids(tokenizer, messages)], use_memory, config)[0].strip()
