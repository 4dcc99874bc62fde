"""The MemoryLlama model classes: a Llama with a latent memory pool per layer (MemoryLLM, Wang et al. 2024), wired.

The class declares its parts in `__init__` and wires them; each part lives in its own file:
- the memory state's tensors: `memory_fields` (buffers), `memory_state` (the value), `memory_state_api` (states,
  snapshots, undo), `memory_store` (the long-term store), `memory_files` / `memory_hub` (on disk, on the Hub);
- reading: `memory_reads` (the table of read modes: `memory_pool_read`, `memory_reader`, and the public read API),
  `memory_prefix` / `shared_prefix_attention` (the prefix in transformers' caches), `memory_generation`;
- writing (`inject`): `memory_text` (checks, chunks), `memory_writer` (new slots), `memory_transition` (drop rule);
- construction: `memory_loading` (`from_pretrained`'s checks, `save_pretrained`, `from_base`).
"""

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM
from transformers import initialization as init
from transformers.utils import logging

from .configuration_memory_llama import MemoryLlamaConfig
from .headless import LlamaHeadless
from .memory_adapters import AdapterWeights, MemoryAdapters
from .memory_embeddings import MemoryEmbeddings
from .memory_fields import MEMORY_BUFFERS, MEMORY_FIELDS, config_geometry, fresh_tensors
from .memory_files import JournalEntry, SpillDirectory, place_store
from .memory_generation import read_before_generate, uncached_length
from .memory_hub import MemoryHubMixin
from .memory_journal import PendingUpdates
from .memory_loading import bos_from_base_model, from_base, load_pretrained, save_pretrained
from .memory_placement import placed_prefill
from .memory_pool import is_sole_reference
from .memory_prefix import cache_prefix_length, continued_read, is_fresh_cache, positions_from_mask
from .memory_reads import MemoryReadMixin, build_reads
from .memory_state import MemoryState
from .memory_state_api import MemoryLock, MemoryOrigin, MemoryStateMixin, Snapshots, SparePool, UndoHistory
from .memory_text import CallNumbers, injection_chunks
from .memory_transition import check_finite_slots
from .memory_writer import new_memory_slots, write_layout
from .mplus_model import MPlusMixin
from .mplus_read import MPlusRetriever
from .shared_prefix_attention import shared_prefix_reads

logger = logging.get_logger(__name__)

PROGRESS_MIN_CHUNKS = 8


class MemoryLlamaForCausalLM(
    MemoryStateMixin, MemoryHubMixin, MemoryReadMixin, MPlusMixin, LlamaForCausalLM, GenerationMixin
):
    """Llama causal LM with a MemoryLLM memory pool: `inject()` writes text into memory, reads are automatic."""

    config_class = MemoryLlamaConfig
    config: MemoryLlamaConfig
    _keys_to_ignore_on_load_missing = [r"^memory", r"^memory_embeddings\."]
    # Batches of >1 rows reading the pool hold its keys/values once (`shared_prefix_attention`); False: per-row copies.
    share_memory_prefix: bool = True

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__(config)
        config.check_memory_settings()  # again: from_pretrained's overrides are set after the config was built
        self.memory_embeddings = MemoryEmbeddings(config)
        fresh = fresh_tensors(config_geometry(config), torch.get_default_dtype(), config.memory_seed)
        for field in MEMORY_FIELDS:  # the memory state's tensors (memory_fields), saved in their own file
            self.register_buffer(field.buffer, fresh[field.name], persistent=field.saved)
        self.adapters = MemoryAdapters(self.model.layers, config.lora_config, config.add_decoder_lora)
        self.reads = build_reads()  # each read mode of READS with its caches (retrieval reads share one index)
        self.retriever = MPlusRetriever(config) if config.retriever_size else None  # M+ (mplus_model)
        self._long_term = self.empty_long_term_memory()  # the store (memory_store) or M+ memory (mplus_memory)
        self.memory_lock = MemoryLock()
        self.retrieval_tokenizer = None  # decodes stored token ids for the text scorers (memory_lexical)
        self.undo_history, self.memory_snapshots = UndoHistory(), Snapshots()
        self.spare_pool, self.memory_origin = SparePool(), MemoryOrigin()
        # injections a save appends to the folder's journal; a disk-backed store's blocks until they are saved
        self.pending_updates, self.store_spill = PendingUpdates(), SpillDirectory()
        self._init_weights(self.memory_embeddings)  # memory parts are added after Llama's own post_init
        if self.retriever is not None:
            self.retriever.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, AdapterWeights):
                module.reset()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MemoryEmbeddings):
            if module.bos_embedding is not None:
                init.normal_(module.bos_embedding, std=self.config.initializer_range)
            init.zeros_(module.new_memory_positional_emb)
        elif module is self:
            fresh = fresh_tensors(config_geometry(self.config), self.memory.dtype, self.config.memory_seed)
            for field in MEMORY_FIELDS:
                init.copy_(getattr(self, field.buffer), fresh[field.name])
            init.normal_(self.memory, std=self.config.initializer_range)

    # ------------------------------------------------------------------ memory state
    @property
    def memory_is_initialized(self) -> bool:
        """False until the first injection (or after `reset_memory`); reads then use no memory."""
        return self.num_filled_slots > 0

    @property
    def num_filled_slots(self) -> int:
        """Slots (at the end of the pool) that hold memories: N once a "tile" pool was written."""
        return int(self.memory_filled)

    @property
    def memory_prefix_length(self) -> int:
        """Positions every layer reads before the tokens: bos (optional) plus the filled slots."""
        return int(self.config.add_bos_embedding) + self.num_filled_slots

    @property
    def num_injections(self) -> int:
        return int(self.memory_injections)

    @property
    def long_term_memory(self) -> tuple:
        """The long-term store: one `MemoryBlock` per stored injection, oldest first (see `memory_store`)."""
        return self._long_term

    def reset_memory(self, seed: int | None = None) -> None:
        """Empty the pool and the long-term store: reads use no memory until the next injection."""
        self.swap_memory_state(MemoryState.empty(self.config, seed, self.memory.dtype, self.memory.device))

    def live_memory_state(self) -> MemoryState:
        """The memory as a state that shares the model's tensors (no copy, no checks; `memory_state()` copies)."""
        buffers = {name: getattr(self, name) for name in MEMORY_BUFFERS}
        return MemoryState.from_buffers(buffers, long_term=self._long_term)

    def swap_memory_state(self, state: MemoryState) -> None:
        """The only place that changes the memory: swaps in `state`'s tensors (never edits them in place), without
        the checks of `load_memory_state` / `set_memory_state` (for states of this model)."""
        with self.memory_lock:
            for name, tensor in state.as_buffers().items():
                current = getattr(self, name)
                setattr(self, name, tensor.to(device=current.device, dtype=current.dtype))
            self._long_term = place_store(state.long_term, self.config.long_term_memory_storage, self.store_spill)

    # ------------------------------------------------------------------ reading (see memory_reads)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        use_memory: bool = True,
        memory_slots: torch.Tensor | None = None,
        **kwargs,
    ):
        """Llama forward reading the memory. `attention_mask` covers the tokens (or prefix + tokens).
        `use_memory=False` runs the plain base model; `memory_slots` [L, k, d] reads those slots instead of the pool
        (training: a fresh, differentiable injection)."""
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        fresh = is_fresh_cache(cache)
        drop_cache = False
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, length = tokens.shape[:2]
        if not fresh and attention_mask is not None and attention_mask.dim() == 2:
            attention_mask, position_ids = continued_read(cache, attention_mask, position_ids, length, tokens.device)
        if self.plain_mplus_read(cache, attention_mask, position_ids, labels, memory_slots, kwargs, use_memory):
            return self.mplus_forward(input_ids, attention_mask, inputs_embeds, logits_to_keep, use_cache)
        if fresh and (memory_slots is not None or self.reads_memory(use_memory)):
            checkpointing = self.training and any(
                getattr(m, "gradient_checkpointing", False) for m in self.model.layers
            )
            cache, attention_mask = self.memory_read(
                input_ids, inputs_embeds, attention_mask, memory_slots=memory_slots, read_only=checkpointing
            )
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask, length)
            drop_cache = checkpointing or use_cache is False or (use_cache is None and not self.config.use_cache)
            use_cache = False if checkpointing else use_cache
        attention_mask, position_ids = placed_prefill(
            self.config, cache, attention_mask, position_ids, tokens, self.dtype)
        with shared_prefix_reads(self.config, cache, attention_mask, kwargs):
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        if drop_cache:
            outputs.cache = None
        return outputs

    def activation_checkpointing_enable(self, *args, **kwargs) -> None:
        """Activation (gradient) checkpointing that keeps the memory prefix: in training the layers only ever receive
        the read-only prefix cache (see `forward`), so a checkpoint replay reads exactly the same keys/values."""
        super().activation_checkpointing_enable(*args, **kwargs)
        for layer in self.model.layers:
            layer._can_checkpoint_with_cache = True

    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        """Standard `generate()`; the memory prefix is added to the cache and the attention mask automatically.
        A cache returned by an earlier call (`cache=`, with the whole sequence so far as input) continues it."""
        read_before_generate(self, inputs, generation_config or self.generation_config, kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids, next_sequence_length=None, cache=None, inputs_embeds=None, is_first_iteration=False, **kwargs
    ):
        """Llama's, except that the first step after a memory prefix feeds exactly the tokens the cache lacks."""
        if is_first_iteration and cache_prefix_length(cache):
            next_sequence_length = uncached_length(input_ids, cache, inputs_embeds)
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length,
            cache,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    # ------------------------------------------------------------------ writing
    def inject(
        self,
        text_or_ids: str | Sequence[str] | torch.Tensor | Sequence[int] | Mapping,
        tokenizer=None,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        progress: bool | None = None,
    ) -> int:
        """Write text (or token ids, or tokenizer output) into memory; returns the number of memory updates made.

        Text longer than `chunk_size` tokens is split into near-equal chunks, injected in order. Each update replaces
        K slots per layer chosen by `generator` (default: the pool's own seeded generator, saved with the memory).
        On any error the memory is left exactly as it was.
        """
        chunks = injection_chunks(self.config, text_or_ids, tokenizer, chunk_size, self.device)
        if tokenizer is not None and self.retrieval_tokenizer is None:
            self.retrieval_tokenizer = tokenizer  # text retrieval decodes the stored token ids with it
        show = len(chunks) >= PROGRESS_MIN_CHUNKS if progress is None else progress
        with self.memory_lock:
            before = self.live_memory_state()
            calls, entries = CallNumbers(), []
            try:
                with torch.no_grad():
                    for text, chunk in logging.tqdm(chunks, desc="Injecting", unit="chunk", disable=not show):
                        call = calls(text, self.num_injections + 1)
                        new = check_finite_slots(self.new_memory_slots(chunk))
                        drawn = None if generator is None else generator.get_state()
                        entries.append(JournalEntry(self.num_injections + 1, call, new, drawn, chunk))
                        state = self.state_after(new, generator, self.spare_pool.take(self.memory), call, chunk)
                        replaced = self.memory
                        self.swap_memory_state(state)
                        del state
                        # A pool between two chunks of this call. (is_sole_reference counts references: keep the
                        # call inline, a helper in between would add one and turn recycling off.)
                        if self.spare_pool.accepts(replaced, self.recycle_pools) and is_sole_reference(replaced):
                            self.spare_pool.keep(replaced)
                        del replaced
            except BaseException:
                self.swap_memory_state(before)
                raise
            self.undo_history.record(before, self.memory, self.undo_depth, self.spare_pool, self.recycle_pools)
            self.record_injections(entries)
        return len(chunks)

    def commit_memory_slots(self, slots: torch.Tensor, generator=None, input_ids: torch.Tensor | None = None) -> None:
        """Write slots [L, k, d] computed by `new_memory_slots` into the pool, as `inject` would (drop rule, undo);
        `input_ids` (the context they were computed from) are kept with them in the long-term store."""
        with self.memory_lock:
            before, new = self.live_memory_state(), check_finite_slots(slots.detach())
            drawn = None if generator is None else generator.get_state()  # (the journal replays the same draw)
            self.swap_memory_state(self.state_after(new, generator, token_ids=input_ids))
            self.undo_history.record(before, self.memory, self.undo_depth, self.spare_pool, self.recycle_pools)
            self.record_injections([JournalEntry(self.num_injections, self.num_injections, new, drawn, input_ids)])

    def write_layout(self, length: int) -> tuple[bool, int, int, bool, int]:
        """The write window for a context of `length` tokens (see `memory_writer.write_layout`)."""
        return write_layout(self.config, self.num_filled_slots, length)

    def new_memory_slots(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """New memory [L, k, d] written by one context [1, n] (no commit; differentiable for training)."""
        return new_memory_slots(self, input_ids)

    # ------------------------------------------------------------------ persistence and construction
    def _apply(self, fn, *args, **kwargs):
        self.spare_pool.clear()
        for read in self.reads.values():
            read.clear()
        return super()._apply(fn, *args, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *args,
        state_dict: dict | None = None,
        overwrite_memory: bool = False,
        **kwargs,
    ):
        """`save_pretrained` with the memory in its own file (`memory.safetensors`), so it can be updated alone.

        Crash-safe over an existing folder (the new folder is written beside it, then swapped in) and locked
        against other savers. Refuses to overwrite a memory that changed on disk since this model was loaded from
        that folder, unless `overwrite_memory=True`."""
        parent = super().save_pretrained
        return save_pretrained(self, parent, save_directory, args, state_dict, overwrite_memory, kwargs)

    @classmethod
    def from_pretrained(cls, *args, allow_other_model=False, drop_long_term_memory=False, **kwargs):
        """`from_pretrained` that checks the memory fully before using it (`memory_loading.load_pretrained`: the pool
        file, this model's fingerprint unless `allow_other_model=True`, the long-term store the pool file records
        unless `drop_long_term_memory=True` drops it on purpose, the pool's shape against the config)."""
        return load_pretrained(cls, super().from_pretrained, args, kwargs, allow_other_model, drop_long_term_memory)

    @classmethod
    def from_base(cls, path_or_repo: str | os.PathLike, gguf_file: str | None = None, memory_update: str = "input",
                  tokenizer=None, **memory_config) -> "MemoryLlamaForCausalLM":
        """Wrap any pretrained Llama checkpoint (folder, Hub id, or GGUF via `gguf_file`) with a fresh memory pool.

        Defaults to the training-free "input" update with a "grow" pool, a long-term store of about 1 GiB (bfloat16)
        and retrieval reads (`read_mode="pool"` keeps the official read). `bos_embedding` starts as the base
        model's own hidden states of its BOS token, so reads see the attention sink the model was trained with.
        With a chat template (the checkpoint's tokenizer, or `tokenizer`), reads are placed where the user's message
        starts (`read_placement="user_turn"`; `read_placement="prefix"` keeps the official place).
        """
        return from_base(cls, path_or_repo, gguf_file, memory_update, tokenizer, **memory_config)

    def bos_from_base_model(self) -> None:
        """Set `bos_embedding[l]` to the input of layer l when the base model reads its BOS token alone."""
        bos_from_base_model(self)


# ---------------------------------------------------------------------- base model (AutoModel)
class MemoryLlamaModel(MemoryLlamaForCausalLM, LlamaHeadless):
    """The memory model read without its LM head (`AutoModel`): `forward` returns `last_hidden_state` (after the
    final norm) of the tokens reading the memory, for embeddings and classifiers. Same checkpoint, same `inject`."""

    def generate(self, *args, **kwargs):
        return LlamaHeadless.generate(self, *args, **kwargs)


MemoryLlamaConfig.register_for_auto_class()
MemoryLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MemoryLlamaModel.register_for_auto_class("AutoModel")

__all__ = ["MemoryEmbeddings", "MemoryLlamaForCausalLM", "MemoryLlamaModel", "MemoryState"]
