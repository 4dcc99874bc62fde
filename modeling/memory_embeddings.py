"""The trainable memory-side vectors (`MemoryEmbeddings`): the per-layer bos slot and the write-position embedding."""

import torch
from torch import nn

from .configuration_memory_llama import MemoryLlamaConfig


class MemoryEmbeddings(nn.Module):
    """Trainable memory-side vectors: the per-layer bos slot [L, 1, d] and the write-position embedding [1, 1, d].

    A module of its own so PEFT can train and save it (`modules_to_save=["memory_embeddings"]`); the model reads
    it only through `forward()`, which PEFT's wrapper routes to the trained copy.
    """

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__()
        d = config.hidden_size
        self.bos_embedding = (
            nn.Parameter(torch.zeros(config.num_hidden_layers, 1, d)) if config.add_bos_embedding else None
        )
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))

    def forward(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self.bos_embedding, self.new_memory_positional_emb
