"""The text read (`read_mode="text"`): the stored tokens of the blocks the retrieval read chooses, read as text.

A long-term block keeps the token ids its slots were written from (`MemoryBlock.token_ids`). The retrieval read
(`memory_reader.RetrieveRead`) reads the blocks' latent slots, which lose part of what the text said; this read takes
exactly the blocks the retrieval read chooses for a row (same scorer, budget, relevance cut, neighbours; `blocks`)
and reads their token ids instead: the blocks in the order written, the chunks of one text joined as they were cut,
`memory_lexical.SEPARATOR` (the tokenizer's ids of it; nothing when no tokenizer is known) between blocks that are
not consecutive chunks of one text and after the last (a blank line between the passage and the user's words). The
model's own layers (no memory, the adapters as they are) encode them into per-layer keys/values, in the context of
the row's header when the read is placed in the user turn (`read_placement="user_turn"`: the template's tokens before
the user's content), so that the prompt then reads exactly what it would read with the passage written at the start of
its user message; a plain-text row (no header: the prefix read) reads what it would read with the passage written
before it. A row whose relevance cut chooses nothing reads nothing.

The prefix contract of `memory_reads` holds: each row's real columns at positions 0.. (a placed row's first
`add_bos_embedding` columns are placeholders the placement hides), left-padded, with a mask of the real columns.
"""

import math

import torch
from transformers.cache_utils import DynamicCache

from .memory_cache import DerivedCache
from .memory_placement import header_lengths, read_split, shift_keys
from .memory_prefix import PrefixKV, execution_device, module_fingerprint
from .memory_lexical import retrieval_tokenizer, separator_ids
from .memory_reader import RetrieveRead, prefix_slots, stack_prefixes

def passage_ids(blocks: list, separator: list[int]) -> list[int]:
    """The token ids one row reads: `blocks` (in the order written) joined, `separator` between blocks that are not
    consecutive chunks of one text and after the last ([] when there are no blocks). Refuses a block stored without
    its token ids."""
    ids: list[int] = []
    previous = None
    for block in blocks:
        if block.token_ids is None:
            raise ValueError(
                f"read_mode='text' reads the token ids each stored block was written from, and injection "
                f"{block.injection} was stored without them (a store saved before token ids were kept, or "
                "commit_memory_slots without input_ids): inject its text again, or use read_mode='retrieve'"
            )
        if previous is not None and not (block.call == previous.call and block.injection == previous.injection + 1):
            ids += separator
        ids += block.token_ids.tolist()
        previous = block
    return ids + separator if blocks else ids


class TextRead(RetrieveRead):
    """Prefix: per row, the stored token ids of the blocks `RetrieveRead.blocks` chooses, encoded by the model's layers
    after the row's header (see the module docstring). Besides the retrieval read's caches it keeps the encoded
    keys/values of recent (header, blocks) pairs (`encoded`, bounded by `model.retrieval_kv_cache_slots` positions;
    stale when any decoder weight or adapter changes) and the separator's ids (`separator`, per tokenizer)."""

    def __init__(self):
        super().__init__()
        self.encoded = DerivedCache(size=prefix_slots)
        self.separator: tuple[object, list[int]] | None = None  # (the tokenizer it was made with, its ids)

    @staticmethod
    def check_config(config) -> None:
        if config.long_term_memory_tokens == 0 or config.retriever_size:
            raise ValueError(
                "read_mode='text' reads the token ids kept by the long-term store: set long_term_memory_tokens > 0 "
                "(an M+ model, retriever_size > 0, has no such store: use read_mode='mplus'; or use read_mode='pool')"
            )

    def separator_ids(self, model) -> list[int]:
        """`SEPARATOR`'s token ids in the model's tokenizer (`model.retrieval_tokenizer`, else the one saved with the
        checkpoint), or [] when none is known."""
        known = model.retrieval_tokenizer
        if self.separator is None or self.separator[0] is not known:
            tokenizer = known
            if tokenizer is None and model.name_or_path:
                try:
                    tokenizer = retrieval_tokenizer(model)
                except ValueError:
                    tokenizer = None
            self.separator = (model.retrieval_tokenizer, [] if tokenizer is None else separator_ids(tokenizer))
        return self.separator[1]

    def longest_prefix(self, model, slots=None) -> int:
        """Positions the prefix of the next read may take at most (known before any scoring): the placeholders of a
        placed read, the most tokens blocks fitting `read_tokens` slots can hold, and a separator after each."""
        cfg, store = model.config, model.long_term_memory
        if not store:
            return int(cfg.add_bos_embedding)
        counts = [0 if b.token_ids is None else b.token_ids.numel() for b in store]
        ratio = max(count / block.num_slots for count, block in zip(counts, store, strict=True))
        tokens = min(sum(counts), math.floor(cfg.read_tokens * ratio))
        blocks = min(len(store), cfg.read_tokens // min(block.num_slots for block in store))
        return int(cfg.add_bos_embedding) + tokens + len(self.separator_ids(model)) * blocks

    @torch.no_grad()
    def prefix(self, model, input_ids, inputs_embeds, attention_mask) -> tuple[PrefixKV, torch.Tensor]:
        """Per-layer keys/values [B, kv, P, hd] of each row's passage (after `add_bos_embedding` placeholder columns
        in rows with a header), left-padded, and the mask [B, P] of the real columns."""
        chosen = self.blocks(model, input_ids, attention_mask, inputs_embeds)
        headers: list[list[int]] = [[] for _ in chosen]
        split = read_split(model.config, input_ids, attention_mask)
        if split is not None:
            lengths = header_lengths(split, attention_mask).tolist()
            for row, length in enumerate(lengths):
                real = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row].bool()]
                headers[row] = real[:length].tolist()
        separator = self.separator_ids(model)
        fingerprint = [model.dtype]
        module_fingerprint(model.model, fingerprint)
        fingerprint = tuple(fingerprint)
        rows = []
        for header, blocks in zip(headers, chosen, strict=True):
            ids = passage_ids(blocks, separator)
            key = (tuple(header), tuple(blocks), tuple(separator))
            compute = lambda h=header, i=ids: self.encode(model, h, i)  # noqa: E731
            rows.append(self.encoded.get(key, fingerprint, compute, model.retrieval_kv_cache_slots))
        return stack_prefixes(rows)

    def encode(self, model, header: list[int], ids: list[int]) -> PrefixKV:
        """Keys/values [1, kv, P, hd] per layer of the passage `ids` read after `header` (one forward over both, no
        memory): `add_bos_embedding` placeholder columns first when there is a header, the passage's keys rotated to
        the positions that follow them."""
        cfg, layers = model.config, model.model.layers
        hidden = int(cfg.add_bos_embedding) if header else 0
        if ids:
            device = execution_device(model.model.embed_tokens)
            cache = DynamicCache(config=cfg)
            model.model(input_ids=torch.tensor([header + ids], device=device), cache=cache, use_cache=True)
            start = len(header)
            kv = [(layer.keys[:, :, start:], layer.values[:, :, start:]) for layer in cache.layers]
            if start != hidden:  # positions 0.. of the prefix contract (the placement moves them back after the header)
                shift = torch.tensor([hidden - start], device=kv[0][0].device)
                kv = shift_keys(kv, model.model.rotary_emb, shift)
        else:
            kv = None
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        out = []
        for index, layer in enumerate(layers):
            like = None if kv is None else kv[index][0]
            pad = torch.zeros(1, cfg.num_key_value_heads, hidden, head_dim, dtype=model.dtype if like is None else
                              like.dtype, device=execution_device(layer) if like is None else like.device)
            if kv is None:
                out.append((pad, pad))
            else:
                k, v = kv[index]
                out.append((torch.cat([pad, k], 2).contiguous(), torch.cat([pad, v], 2).contiguous()))
        return out

    def clear(self) -> None:
        super().clear()
        self.encoded.clear()
