"""Read modes: what every layer reads in front of a prompt batch (`config.read_mode`); `READS` is the table.

A read mode is a class with one interface, created once per model (`model.reads[name]`, in `__init__`), so it owns
its caches:

- `check_config(config)` (static): raise ValueError (saying what to set) when the configuration cannot serve it;
- `has_memory(model)`: whether there is anything to read (no prefix otherwise: the plain base model runs);
- `read(model, batch, rows, slots, read_only, max_cache_len)`: the cache seeded with the prefix for `rows` cache
  rows and the attention mask [B, prefix + tokens] of one `ReadBatch` (`slots`: explicit slots to read instead);
- `clear()`: forget its caches. What it caches and when that is stale is said in its docstring; every cache follows
  the one rule of `memory_cache`.

A new read mode is one file with its class plus one line in `READS`; the config's validation, the model's dispatch
and the command line's `--read-mode` choices all follow the table.
"""

import dataclasses

import torch

from .memory_pool_read import PoolRead
from .memory_reader import RetrieveRead

READS = {
    "pool": PoolRead,
    "retrieve": RetrieveRead,
}


@dataclasses.dataclass
class ReadBatch:
    """One prompt batch as a read sees it: token ids or embeddings [B, T, ...] and the user's attention mask."""

    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None

    @property
    def tokens(self) -> torch.Tensor:
        return self.input_ids if self.input_ids is not None else self.inputs_embeds

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

