"""Scoring stored injections against a prompt (training-free, from the model's own states). PLACEHOLDER scorer:
mean over prompt tokens of the best cosine similarity to a block's layer-0 slots."""

import torch

DEFAULT_THRESHOLD = None


def block_features(layers, slots: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features of one block from its slots [L, k, d]."""
    return {"unit": torch.nn.functional.normalize(slots[0].float(), dim=-1)}


def question_features(layers, hidden_states, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Features of a batch of prompts from their layer inputs (`hidden_states[l]` [B, T, d] is layer l's input)."""
    hidden = hidden_states[0]
    mask = torch.ones(hidden.shape[:2], device=hidden.device) if attention_mask is None else attention_mask
    return {"unit": torch.nn.functional.normalize(hidden.float(), dim=-1), "mask": mask.float()}


def score_blocks(question: dict[str, torch.Tensor], blocks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Scores [B, num_blocks]: higher = more relevant."""
    unit, mask = question["unit"], question["mask"]
    columns = []
    for block in blocks:
        best = torch.einsum("btd,kd->btk", unit, block["unit"].to(unit.device)).amax(-1)
        columns.append((best * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    return torch.stack(columns, dim=1)
