"""Read modes: what every layer reads in front of a prompt batch (`config.read_mode`); `READS` is the table.

A read mode is a class with one interface, created once per model (`model.reads[name]`, in `__init__`), so it owns
its caches:

- `check_config(config)` (static): raise ValueError (saying what to set) when the configuration cannot serve it;
- `from_base_defaults(memory_config, base_config)` (static): the settings `from_base` adds (unless given) for it;
- `has_memory(model)`: whether there is anything to read (no prefix otherwise: the plain base model runs);
- `read(model, batch, rows, slots, read_only, max_cache_len)`: the cache seeded with the prefix for `rows` cache
  rows and the attention mask [B, prefix + tokens] of one `ReadBatch` (`slots`: explicit slots to read instead);
- `prefix(model, input_ids, inputs_embeds, attention_mask)`: the prefix's keys/values [1 or B, kv, P, d] (each row's
  real columns at positions 0..) and the mask [B, P] of the columns each row reads (None: all), which a read
  placement (`memory_placement.PLACEMENTS`, `config.read_placement`) moves elsewhere in the prompt;
- `longest_prefix(model, slots)`: the most positions its next prefix takes (known before any compute: a prefix
  plus a prompt past the model's window is warned about first);
- `clear()`: forget its caches. What it caches and when that is stale is said in its docstring; every cache follows
  the one rule of `memory_cache`.

A new read mode is one file with its class plus one line in `READS`; the config's validation, the model's dispatch
(`MemoryReadMixin.memory_read`, the model's public read API), `from_base`'s defaults and the command line's
`--read-mode` choices all follow the table.
"""

import dataclasses

import torch
from transformers.utils import logging

from .memory_placement import check_token_mask, placed_generate_masks, placed_read, read_split
from .memory_pool_read import PoolRead
from .memory_reader import RetrieveRead
from .memory_text_read import TextRead
from .mplus_read import MPlusRead

logger = logging.get_logger(__name__)

READS = {
    "pool": PoolRead,
    "retrieve": RetrieveRead,
    "mplus": MPlusRead,
    "text": TextRead,
}


def build_reads() -> dict:
    """One object per read mode of `READS` (a model's `reads`, created in its `__init__`); the reads that choose
    blocks by retrieval scores (`RetrieveRead` and its subclasses) share one scoring, i.e. one index of the store."""
    reads = {name: read() for name, read in READS.items()}
    retrieval = [read for read in reads.values() if isinstance(read, RetrieveRead)]
    for read in retrieval[1:]:
        read.scoring = retrieval[0].scoring
    return reads


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



def warn_past_window(config, prefix: int, length: int) -> None:
    """Warn (once per set of numbers, before any compute) when a prefix of `prefix` positions plus a prompt of
    `length` tokens passes the model's window (`max_position_embeddings`): the prompt's last positions were never
    trained, and answers degrade."""
    window = config.max_position_embeddings
    if prefix + length > window:
        logger.warning_once(
            f"the memory prefix (up to {prefix:,} positions) plus "
            f"the prompt ({length:,} tokens) = {prefix + length:,} positions, past the model's window of {window:,} "
            "(max_position_embeddings): shorten the prompt, or read fewer slots (read_tokens, a smaller pool)"
        )


class MemoryReadMixin:
    """The memory model's public read API (the reads themselves are the objects of `model.reads`, one per entry of
    `READS`, created in the model's `__init__`)."""

    # Blocks whose (un-rotated) keys/values the retrieval read keeps for the next reads, in slots per layer (least
    # recently read leave first). A question's prefix is then the cached keys/values rotated to their positions.
    retrieval_kv_cache_slots: int = 8192

    def memory_prefix_hidden(self, slots: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-layer prefix hidden states `[bos_l; slots_l]` ([P, d] each); slots default to the filled pool."""
        bos, _ = self.memory_embeddings()
        if slots is None:
            slots = self.memory[:, self.config.num_memory_tokens - self.num_filled_slots :]
        if bos is None:
            return list(slots)
        return list(torch.cat([bos.to(slots.device, slots.dtype), slots], dim=1))

    @property
    def read_mode(self) -> str:
        """`config.read_mode`, checked at every read (edited after construction? never fall back silently)."""
        self.config.check_memory_settings()
        return self.config.read_mode

    def reads_memory(self, use_memory: bool = True) -> bool:
        """Whether a fresh read now has a memory prefix (False: the plain base model runs)."""
        return use_memory and self.reads[self.read_mode].has_memory(self)

    def memory_read(self, input_ids, inputs_embeds, attention_mask, rows=None, memory_slots=None, read_only=False,
                    max_cache_len=None):
        """(cache seeded with the memory prefix for `rows` cache rows (default: the batch; beams repeat each row),
        attention mask [B, prefix + tokens]) of a fresh read by `config.read_mode` (`memory_slots`: read those
        slots with the pool read). `max_cache_len`: a static cache with room for that many positions after the
        prefix."""
        batch = ReadBatch(input_ids, inputs_embeds, attention_mask)
        read = self.reads["pool"] if memory_slots is not None else self.reads[self.read_mode]
        warn_past_window(self.config, read.longest_prefix(self, memory_slots), batch.length)
        split = read_split(self.config, input_ids, attention_mask) if memory_slots is None else None
        if split is not None:  # `read_placement="user_turn"`: the prefix after each row's header
            check_token_mask(attention_mask, batch.length)
            prefix_kv, prefix_mask = read.prefix(self, input_ids, inputs_embeds, attention_mask)
            rows = rows or batch.size
            return placed_read(self, prefix_kv, prefix_mask, input_ids, attention_mask, split, rows, read_only,
                               max_cache_len)
        return read.read(self, batch, rows or batch.size, memory_slots, read_only, max_cache_len)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
        """transformers' `create_masks_for_generate` (static caches); see `memory_placement.placed_generate_masks`."""
        return placed_generate_masks(config, inputs_embeds, attention_mask, cache, position_ids, **kwargs)

    def memory_key_values(self, slots: torch.Tensor | None = None):
        """Keys/values of the memory prefix (the pool, or explicit `slots` [L, k, d]) for the active adapter.
        The pool's are cached until the memory or the weights change; they are computed afresh (with gradient)
        when gradients can flow into the prefix path."""
        return self.reads["pool"].prefix_key_values(self, slots)

    def clear_memory_key_values(self) -> None:
        """Forget the cached keys/values of the pool's prefix (the next read computes them again)."""
        self.reads["pool"].clear()

    def memory_cache(self, batch_size=1, slots=None, read_only=False, max_cache_len=None):
        """A cache pre-filled with the memory prefix (`[bos; pool]`, or `[bos; slots]`) for `batch_size` rows
        (a `StaticCache` of `max_cache_len` positions when given). Rows of a batch share one copy of the pool's
        prefix (`SharedPrefixCache`, see `share_memory_prefix`)."""
        return self.reads["pool"].cache(self, batch_size, slots, read_only, max_cache_len)

    @torch.no_grad()
    def retrieval_scores(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """Scores [B, stored injections] of every long-term block against each prompt row (higher = more relevant)."""
        return self.reads["retrieve"].scores(self, input_ids, attention_mask, inputs_embeds)

    def retrieve(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> list[list[int]]:
        """The injection numbers each prompt row reads with `read_mode="retrieve"` (in the order written)."""
        chosen = self.reads["retrieve"].blocks(self, input_ids, attention_mask, inputs_embeds)
        return [[block.injection for block in row] for row in chosen]

    @property
    def last_retrieval(self):
        """What the last read of the current read mode retrieved (None before the first, and for the pool read):
        "retrieve": the injection numbers each prompt row read; "mplus": `mplus_read.MPlusRetrieval`."""
        return getattr(self.reads[self.config.read_mode], "last", None)

    @last_retrieval.setter
    def last_retrieval(self, value) -> None:
        self.reads[self.config.read_mode].last = value
