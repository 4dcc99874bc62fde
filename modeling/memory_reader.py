"""Retrieval reads: which stored injections each row of a batch reads, and the rows' prefixes side by side.

`read_mode="retrieve"` replaces the pool read `[bos; pool]` by `[bos; the slots of the injections that score best
against the prompt, in the order they were written]`. The scores come from `memory_retrieval`; this file turns them
into a choice per row (`select_injections`) and stacks rows whose prefixes differ in length into one left-padded
cache (`stack_prefixes`): a row's padding columns are masked out, so a batch reads exactly what its rows read alone.
`LongTermMemoryMixin` gives the model its store-facing API (scores, retrieval, loading a checkpoint's store).
"""

from collections import OrderedDict

import torch

from .memory_adapters import READ
from .memory_lexical import TEXT_SCORERS, TextScorer
from .memory_prefix import PrefixKV, rotate_prefix_keys, slot_key_values
from .memory_retrieval import block_features, pack_blocks, question_features, retrieval_key_layers, score_packed
from .memory_store import LONG_TERM_FILE, LongTermStoreError, check_token_vocab, load_store, validate_store


def select_injections(
    scores: torch.Tensor,
    sizes: list[int],
    calls: list[int],
    budget: int,
    threshold: float | None = None,
    neighbors: int = 0,
    margin: float | None = None,
) -> list[int]:
    """Indices (ascending, i.e. in the order written) of the blocks one row reads.

    Blocks are taken best score first while their slots fit the `budget`; a block scoring below `threshold`, or more
    than `margin` below the best block, is not taken for its own score. With `neighbors` > 0, after each taken block
    the `neighbors` blocks before and after it that belong to the same text (`calls`: the first update of the text)
    are taken too, nearest first, while they fit (a long text is several blocks). Ties are broken by recency (the newer block first), so the choice is deterministic.
    """
    count = len(sizes)
    if scores.shape != (count,):
        raise ValueError(f"need one score per block: {tuple(scores.shape)} scores for {count} blocks")
    order = sorted(range(count), key=lambda i: (-float(scores[i]), -i))
    chosen: set[int] = set()
    used = 0

    def take(index: int) -> None:
        nonlocal used
        if index not in chosen and used + sizes[index] <= budget:
            chosen.add(index)
            used += sizes[index]

    floor = threshold
    if margin is not None and count:
        best = float(scores[order[0]]) - margin
        floor = best if floor is None else max(floor, best)
    for index in order:
        if floor is not None and float(scores[index]) < floor:
            break
        if index in chosen:
            continue
        take(index)
        if index not in chosen:
            continue
        for step in range(1, neighbors + 1):
            for other in (index - step, index + step):
                if 0 <= other < count and calls[other] == calls[index]:
                    take(other)
        if used >= budget:
            break
    return sorted(chosen)


def stack_prefixes(rows: list[PrefixKV]) -> tuple[PrefixKV, torch.Tensor]:
    """Per-layer keys/values [B, kv_heads, P, head_dim] of rows whose prefixes ([1, kv_heads, P_b, head_dim] each)
    differ in length, left-padded with zeros to the longest, and the mask [B, P] of the real prefix columns."""
    lengths = [row[0][0].shape[2] for row in rows]
    longest = max(lengths)
    reference = rows[0][0][0]
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=reference.device)
    for index, length in enumerate(lengths):
        mask[index, longest - length :] = 1
    stacked = []
    for layer in range(len(rows[0])):
        keys, values = [], []
        for row, length in zip(rows, lengths, strict=True):
            k, v = row[layer]
            if length < longest:
                pad = (0, 0, longest - length, 0)
                k, v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
            keys.append(k)
            values.append(v)
        stacked.append((torch.cat(keys).contiguous(), torch.cat(values).contiguous()))
    return stacked, mask


class LongTermMemoryMixin:
    """The long-term store and retrieval reads of MemoryLlama (relies on the model's `_long_term`, `_memory_lock`,
    `memory`, `adapters`, `memory_prefix_hidden`)."""

    @property
    def long_term_memory(self) -> tuple:
        """The long-term store: one `MemoryBlock` per stored injection, oldest first (see `memory_store`)."""
        return self._long_term

    @torch.no_grad()
    def retrieval_scores(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores [B, stored injections] of every long-term block against each prompt row (higher = more relevant)."""
        if self.config.retrieval_scorer in TEXT_SCORERS:
            return self._text_scores(input_ids, attention_mask)
        with self._memory_lock:
            store = self._long_term
            dtype, device = self.memory.dtype, self.memory.device
            key_layers = retrieval_key_layers(self.config.num_hidden_layers)
            packed = self.__dict__.get("_packed_store")
            if packed is None or packed[0] is not store or packed[1] != (key_layers, device):
                features = []
                for block in store:
                    if block.features is None:  # computed once per block, on first use
                        slots = block.slots.to(device=device, dtype=dtype)
                        block.features = block_features(self.model.layers, slots, key_layers)
                    features.append(block.features)
                # packed once per store (a store is an immutable tuple: a new one after every injection)
                packed = (store, (key_layers, device), pack_blocks(features, device))
                self.__dict__["_packed_store"] = packed
        with self.adapters.use(READ):
            hidden = self.model(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states
        if not store:
            return hidden[0].new_zeros(hidden[0].shape[0], 0)
        return score_packed(question_features(self.model.layers, hidden, attention_mask, key_layers), packed[2])

    def _text_scores(self, input_ids, attention_mask) -> torch.Tensor:
        """`retrieval_scores` of the text scorers (`memory_lexical.TextScorer`): from the prompt's words, no forward."""
        kind = self.config.retrieval_scorer
        if input_ids is None:
            raise ValueError(f"retrieval_scorer={kind!r} reads the prompt's words: pass input_ids (not only "
                             "inputs_embeds), or set config.retrieval_scorer='model'")
        masks = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        rows = [ids[mask] for ids, mask in zip(input_ids, masks, strict=True)]
        with self._memory_lock:
            store = self._long_term
            scorer = self._text_scorer
            if scorer is None or scorer.kind != kind:
                scorer = self._text_scorer = TextScorer(self._retrieval_tokenizer(), kind)
            return scorer.score(store, [row.tolist() for row in rows]).to(input_ids.device)

    def _retrieval_tokenizer(self):
        """The tokenizer the text scorers decode with: `retrieval_tokenizer` (set by `memoryllm_hf.load` and by
        `inject(text, tokenizer=...)`), else the one saved with the checkpoint."""
        if self.retrieval_tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self.retrieval_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"retrieval_scorer={self.config.retrieval_scorer!r} decodes token ids to words and found no "
                    f"tokenizer ({err}); set model.retrieval_tokenizer = tokenizer"
                ) from None
        return self.retrieval_tokenizer

    def retrieve(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """The injection numbers each prompt row reads with `read_mode="retrieve"` (in the order written)."""
        chosen = self._retrieved_blocks(input_ids, inputs_embeds, attention_mask)
        return [[block.injection for block in row] for row in chosen]

    def _retrieved_blocks(self, input_ids, inputs_embeds, attention_mask) -> list[list]:
        """The blocks each row reads; also kept as `last_retrieval` (injection numbers per row)."""
        with self._memory_lock:
            store = self._long_term
            scores = self.retrieval_scores(input_ids, attention_mask, inputs_embeds)
        cfg = self.config
        sizes, calls = [block.num_slots for block in store], [block.call for block in store]
        chosen = [
            select_injections(
                row, sizes, calls, cfg.read_tokens, cfg.retrieval_threshold, cfg.retrieval_neighbors,
                cfg.retrieval_margin,
            )
            for row in scores.float().cpu()
        ]
        self.last_retrieval = [[store[i].injection for i in row] for row in chosen]
        return [[store[i] for i in row] for row in chosen]

    # Blocks whose (un-rotated) keys/values are kept for the next reads, in slots per layer (least recently read
    # leave first). A question's prefix is then the cached keys/values rotated to their positions.
    retrieval_kv_cache_slots: int = 8192

    @torch.no_grad()
    def _retrieved_prefix(self, input_ids, inputs_embeds, attention_mask):
        """Per-layer keys/values [B, kv, P, hd] of each row's `[bos; retrieved slots]`, left-padded, and the mask
        [B, P] of the real prefix columns (rows that chose the same injections share one computation)."""
        by_choice: dict[tuple, PrefixKV] = {}
        rows = []
        with self.adapters.use(READ):
            weights = self._key_value_weights_fingerprint()
            for blocks in self._retrieved_blocks(input_ids, inputs_embeds, attention_mask):
                key = tuple(block.injection for block in blocks)
                if key not in by_choice:
                    parts = [self._bos_key_values(weights)] + [self._block_key_values(b, weights) for b in blocks]
                    joined = [
                        (torch.cat([p[layer][0] for p in parts], 2), torch.cat([p[layer][1] for p in parts], 2))
                        for layer in range(len(parts[0]))
                    ]
                    by_choice[key] = rotate_prefix_keys(joined, self.model.rotary_emb)
                rows.append(by_choice[key])
        return stack_prefixes(rows)

    def _bos_key_values(self, weights: tuple) -> PrefixKV:
        bos, _ = self.memory_embeddings()
        if bos is None:
            empty = self.memory.new_zeros(self.config.num_hidden_layers, 0, self.config.hidden_size)
            return slot_key_values(self.model.layers, list(empty))
        return self._cached_key_values(("bos",), weights, lambda: bos.to(self.memory.dtype))

    def _block_key_values(self, block, weights: tuple) -> PrefixKV:
        slots = lambda: block.slots.to(device=self.memory.device, dtype=self.memory.dtype)  # noqa: E731
        return self._cached_key_values((block.injection, id(block.slots)), weights, slots)

    def _cached_key_values(self, key: tuple, weights: tuple, hidden) -> PrefixKV:
        cache = self.__dict__.setdefault("_retrieval_kv_cache", OrderedDict())
        found = cache.get(key)
        if found is not None and found[0] == weights:
            cache.move_to_end(key)
            return found[1]
        kv = slot_key_values(self.model.layers, list(hidden()))
        cache[key] = (weights, kv)
        while sum(entry[1][0][0].shape[2] for entry in cache.values()) > self.retrieval_kv_cache_slots:
            cache.popitem(last=False)
        return kv

    def _load_long_term_file(self, path_or_repo, kwargs: dict) -> None:
        """Install the checkpoint's long-term store (`long_term_memory.safetensors`), if it has one."""
        from transformers.utils import cached_file

        options = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "subfolder", "local_files_only") if k in kwargs}
        path = cached_file(
            path_or_repo,
            LONG_TERM_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **options,
        )
        if path is None:
            return
        try:
            store = load_store(path, self.memory_fingerprint())
            validate_store(store, self.config.num_hidden_layers, self.config.hidden_size, self.num_injections)
            check_token_vocab(store, self.config.vocab_size)
        except LongTermStoreError as err:
            raise ValueError(f"{path_or_repo}: {err}") from None
        dtype = getattr(torch, self.config.long_term_memory_dtype) if self.config.long_term_memory_dtype else None
        device = self.config.long_term_memory_device or "cpu"
        for block in store:
            block.slots = block.slots.to(device=device, dtype=dtype or block.slots.dtype)
        with self._memory_lock:
            self._long_term = store

