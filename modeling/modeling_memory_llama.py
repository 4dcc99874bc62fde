"""MemoryLlama: a Llama decoder with a fixed-size latent memory pool per layer (MemoryLLM, Wang et al. 2024).

Reading: every layer attends to `[bos_l; memory_l; tokens]`. The memory's keys/values are computed once per memory
state and seeded into the generation cache, so the stock `LlamaModel` and `generate()` do the rest.
Writing (`inject`): each layer sees `[bos_l; last K slots; context]`; K new slots per layer come out, K random old
slots are dropped (see `memory_pool`).
"""

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, GgufConfig, LlamaForCausalLM
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging

from .configuration_memory_llama import MemoryLlamaConfig
from .memory_adapters import READ, WRITE, AdapterWeights, MemoryAdapters
from .headless import LlamaHeadless
from .memory_generation import static_cache_room, uncached_length
from .memory_hub import MemoryHubMixin, checkpoint_memory_file
from .memory_inputs import encoding_rows
from .memory_pool import is_sole_reference
from .memory_reader import LongTermMemoryMixin
from .memory_prefix import (
    PrefixKV,
    cache_prefix_length,
    cache_prefix_mask,
    extend_attention_mask,
    positions_from_mask,
    prefix_key_values,
    record_prefix,
    seeded_cache,
)
from .memory_state import (
    MEMORY_BUFFERS,
    MemoryLock,
    MemoryState,
    MemoryStateMixin,
    check_finite_slots,
    is_blank_text,
    next_state,
    seeded_rng_state,
)
from .memory_store import default_long_term_tokens
from .shared_prefix_attention import SharedPrefixCache, shared_prefix_reads, shares_prefix

logger = logging.get_logger(__name__)

PROGRESS_MIN_CHUNKS = 8
# `from_base` keyword arguments that go to `from_pretrained` (the others configure the memory).
FROM_BASE_LOAD_KWARGS = (
    "dtype", "revision", "device_map", "offload_folder", "attn_implementation", "token", "cache_dir", "local_files_only"
)


def _drop_load_report(record) -> bool:
    """Log filter leaving out transformers' load report (see `from_base`)."""
    return "LOAD REPORT" not in record.getMessage()


def _module_fingerprint(module: nn.Module, parts: list) -> None:
    """Append the identity, adapter settings and parameter versions of `module` and its submodules. Runs at every
    question, so it walks `_modules`/`_parameters` directly (`modules()`/`parameters()` cost ~7x more)."""
    parts.append(id(module))
    if "active_adapter" in module.__dict__ or hasattr(type(module), "active_adapter"):
        parts += [
            str(module.active_adapter),
            getattr(module, "merged", None),
            getattr(module, "disable_adapters", None),
        ]
    for param in module._parameters.values():
        if param is not None:
            parts += [param.data_ptr(), param._version]
    for child in module._modules.values():
        if child is not None:
            _module_fingerprint(child, parts)


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


class MemoryLlamaForCausalLM(
    MemoryStateMixin, MemoryHubMixin, LongTermMemoryMixin, LlamaForCausalLM, GenerationMixin
):
    """Llama causal LM with a MemoryLLM memory pool: `inject()` writes text into memory, reads are automatic."""

    config_class = MemoryLlamaConfig
    config: MemoryLlamaConfig
    _keys_to_ignore_on_load_missing = [r"^memory", r"^memory_embeddings\."]
    # Batches of >1 rows reading the pool hold its keys/values once (`shared_prefix_attention`); False: per-row copies.
    share_memory_prefix: bool = True

    def __init__(self, config: MemoryLlamaConfig):
        super().__init__(config)
        L, N, d = config.num_hidden_layers, config.num_memory_tokens, config.hidden_size
        self.memory_embeddings = MemoryEmbeddings(config)
        self.register_buffer("memory", torch.zeros(L, N, d), persistent=True)
        self.register_buffer("memory_filled", torch.tensor(0, dtype=torch.long), persistent=True)
        self.register_buffer("memory_injections", torch.tensor(0, dtype=torch.long), persistent=True)
        self.register_buffer("memory_rng_state", seeded_rng_state(config.memory_seed), persistent=True)
        self.register_buffer("memory_written_at", torch.zeros(L, N, dtype=torch.long), persistent=True)
        self.adapters = MemoryAdapters(self.model.layers, config.lora_config, config.add_decoder_lora)
        self._prefix_kv: tuple[tuple, PrefixKV] | None = None
        self._long_term: tuple = ()  # the long-term store (memory_store), part of every memory state
        self._memory_lock = MemoryLock()
        self._init_weights(self.memory_embeddings)  # memory parts are added after Llama's own post_init
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
            init.normal_(self.memory, std=self.config.initializer_range)
            init.zeros_(self.memory_filled)
            init.zeros_(self.memory_injections)
            init.copy_(self.memory_rng_state, seeded_rng_state(self.config.memory_seed))
            init.zeros_(self.memory_written_at)

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

    def reset_memory(self, seed: int | None = None) -> None:
        """Empty the pool and the long-term store: reads use no memory until the next injection."""
        seed = self.config.memory_seed if seed is None else seed
        self._set_state(
            MemoryState(
                memory=torch.zeros_like(self.memory),
                filled=torch.zeros_like(self.memory_filled),
                injections=torch.zeros_like(self.memory_injections),
                rng_state=seeded_rng_state(seed).to(self.memory_rng_state.device),
                written_at=torch.zeros_like(self.memory_written_at),
            )
        )

    def _current_state(self) -> MemoryState:
        buffers = {name: getattr(self, name) for name in MEMORY_BUFFERS}
        return MemoryState.from_buffers(buffers, long_term=self._long_term)

    def _set_state(self, state: MemoryState) -> None:
        """The only place that changes the memory: swaps in new tensors (never edits them in place)."""
        with self._memory_lock:
            for name, tensor in state.as_buffers().items():
                current = getattr(self, name)
                setattr(self, name, tensor.to(device=current.device, dtype=current.dtype))
            self._long_term = state.long_term
            # The cached memory keys/values belong to the old pool; its address may be reused by a later pool.
            self._prefix_kv = None

    # ------------------------------------------------------------------ reading
    def memory_prefix_hidden(self, slots: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-layer prefix hidden states `[bos_l; slots_l]` ([P, d] each); slots default to the filled pool."""
        bos, _ = self.memory_embeddings()
        if slots is None:
            slots = self.memory[:, self.config.num_memory_tokens - self.num_filled_slots :]
        if bos is None:
            return list(slots)
        return list(torch.cat([bos.to(slots.device, slots.dtype), slots], dim=1))

    def _prefix_fingerprint(self) -> tuple:
        """Everything the memory keys/values depend on: memory tensor versions and the weights/adapters in use."""
        parts = (self.memory.data_ptr(), self.memory._version, self.memory.dtype, self.memory.device)
        return parts + (self.num_filled_slots,) + self._key_value_weights_fingerprint()

    def _key_value_weights_fingerprint(self) -> tuple:
        """What a slot's keys/values depend on besides the slot: bos, the norms and k/v projections (with adapters)."""
        parts: list = []
        bos, _ = self.memory_embeddings()
        if bos is not None:
            parts += [bos.data_ptr(), bos._version]
        for layer in self.model.layers._modules.values():
            attention = layer._modules["self_attn"]._modules
            for module in (layer._modules["input_layernorm"], attention["k_proj"], attention["v_proj"]):
                _module_fingerprint(module, parts)
        return tuple(parts)

    def memory_key_values(self, slots: torch.Tensor | None = None) -> PrefixKV:
        """Keys/values of the memory prefix (the pool, or explicit `slots` [L, k, d]) for the active adapter.
        The pool's are cached until the memory or the weights change; they are computed afresh (with gradient)
        when gradients can flow into the prefix path."""
        if slots is not None or (torch.is_grad_enabled() and self._prefix_needs_grad()):
            return prefix_key_values(self.model.layers, self.model.rotary_emb, self.memory_prefix_hidden(slots))
        with self._memory_lock:
            fingerprint = self._prefix_fingerprint()
            if self._prefix_kv is None or self._prefix_kv[0] != fingerprint:
                with torch.no_grad():
                    kv = prefix_key_values(self.model.layers, self.model.rotary_emb, self.memory_prefix_hidden())
                self._prefix_kv = (fingerprint, kv)
            return self._prefix_kv[1]

    def clear_memory_key_values(self) -> None:
        """Forget the cached keys/values of the pool's prefix (the next read computes them again)."""
        with self._memory_lock:
            self._prefix_kv = None

    def _prefix_needs_grad(self) -> bool:
        bos, _ = self.memory_embeddings()
        modules = [m for layer in self.model.layers for m in (layer.input_layernorm, layer.self_attn)]
        return (bos is not None and bos.requires_grad) or any(p.requires_grad for m in modules for p in m.parameters())

    def memory_cache(
        self,
        batch_size: int = 1,
        slots: torch.Tensor | None = None,
        read_only: bool = False,
        max_cache_len: int | None = None,
    ):
        """A cache pre-filled with the memory prefix (`[bos; pool]`, or `[bos; slots]`) for `batch_size` rows
        (a `StaticCache` of `max_cache_len` positions when given). Rows of a batch share one copy of the pool's
        prefix (`SharedPrefixCache`, see `share_memory_prefix`)."""
        prefix_kv = self.memory_key_values(slots)
        shared = self.share_memory_prefix and slots is None and not read_only and not self.training
        if shared and max_cache_len is None and shares_prefix(self.config, batch_size):
            return record_prefix(SharedPrefixCache(prefix_kv), prefix_kv)
        return seeded_cache(self.config, prefix_kv, batch_size, read_only, max_cache_len)

    def _memory_prefix(
        self,
        batch_size: int,
        slots: torch.Tensor | None = None,
        read_only: bool = False,
        max_cache_len: int | None = None,
    ):
        """(cache, prefix length) taken from one consistent memory state. `max_cache_len` asks for a static cache
        with room for that many token positions after the prefix."""
        with self._memory_lock:
            length = self.memory_prefix_length if slots is None else int(self.config.add_bos_embedding) + slots.shape[1]
            static = None if max_cache_len is None else length + max_cache_len
            return self.memory_cache(batch_size, slots, read_only, static), length

    def _memory_read(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rows: int | None = None,
        memory_slots: torch.Tensor | None = None,
        read_only: bool = False,
        max_cache_len: int | None = None,
    ):
        """(cache seeded with the memory prefix for `rows` cache rows (default: the batch; beams repeat each row),
        attention mask [B, prefix + tokens]) of a fresh read: the pool (or `memory_slots`), or with
        `read_mode="retrieve"` each row's retrieved injections. `max_cache_len`: a static cache with room for that
        many token positions after the prefix."""
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, length = tokens.shape[:2]
        rows = rows or batch
        if memory_slots is not None or self._read_mode() == "pool":
            cache, prefix = self._memory_prefix(rows, memory_slots, read_only, max_cache_len)
            return cache, extend_attention_mask(attention_mask, batch, length, prefix, tokens.device)
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] != length):
            raise ValueError(
                f"with read_mode='retrieve' the attention_mask covers the tokens only: expected [batch, {length}], "
                f"got {tuple(attention_mask.shape)}"
            )
        prefix_kv, prefix_mask = self._retrieved_prefix(input_ids, inputs_embeds, attention_mask)
        if rows != batch:
            repeat = rows // batch
            prefix_kv = [(k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in prefix_kv]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=tokens.device)
        full_mask = torch.cat([prefix_mask.to(attention_mask.device, attention_mask.dtype), attention_mask], dim=1)
        static = None if max_cache_len is None else prefix_mask.shape[1] + max_cache_len
        prefix_mask = prefix_mask.repeat_interleave(rows // batch, 0)
        return seeded_cache(self.config, prefix_kv, rows, read_only, static, prefix_mask), full_mask

    def _read_mode(self) -> str:
        self.config.check_long_term_memory()  # edited after construction? never fall back to the pool silently
        return self.config.read_mode

    def _reads_memory(self, use_memory: bool) -> bool:
        if not use_memory:
            return False
        return bool(self._long_term) if self._read_mode() == "retrieve" else self.memory_is_initialized

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
        fresh = cache is None or cache.get_seq_length() == 0
        drop_cache = False
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch, length = tokens.shape[:2]
        if not fresh and attention_mask is not None and attention_mask.dim() == 2:
            # continuing from a cache: the mask covers the tokens so far (or the memory prefix and them); positions
            # follow it, so right-padded rows continue where their own tokens ended
            prefix = cache_prefix_length(cache)
            seen = int(cache.get_seq_length()) - prefix + length
            if prefix:
                attention_mask = extend_attention_mask(
                    attention_mask, batch, seen, prefix, tokens.device, cache_prefix_mask(cache, batch)
                )
            if position_ids is None and attention_mask.shape[1] == prefix + seen:
                position_ids = positions_from_mask(attention_mask, length)
        if fresh and (memory_slots is not None or self._reads_memory(use_memory)):
            checkpointing = self.training and any(
                getattr(m, "gradient_checkpointing", False) for m in self.model.layers
            )
            cache, attention_mask = self._memory_read(
                input_ids, inputs_embeds, attention_mask, memory_slots=memory_slots, read_only=checkpointing
            )
            if position_ids is None:
                position_ids = positions_from_mask(attention_mask, length)
            drop_cache = checkpointing or use_cache is False or (use_cache is None and not self.config.use_cache)
            use_cache = False if checkpointing else use_cache
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
        given_cache = kwargs.get("cache", kwargs.get("past_key_values"))
        candidates = (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
        tokens = next((t for t in candidates if t is not None), None)
        prefix = cache_prefix_length(given_cache)
        if given_cache is None and tokens is not None and self._reads_memory(kwargs.get("use_memory", True)):
            batch, length = tokens.shape[:2]
            config = generation_config or self.generation_config
            beams = kwargs.get("num_beams", config.num_beams) or 1
            returns = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
            room = static_cache_room(config, kwargs, length)
            input_ids = inputs if inputs is not None else kwargs.get("input_ids")
            inputs_embeds = kwargs.get("inputs_embeds") if input_ids is None else None
            kwargs["cache"], kwargs["attention_mask"] = self._memory_read(
                input_ids, inputs_embeds, kwargs.get("attention_mask"), rows=batch * max(beams, returns),
                max_cache_len=room,
            )
        elif prefix:
            batch, length = tokens.shape[:2]
            kwargs["attention_mask"] = extend_attention_mask(
                kwargs.get("attention_mask"), batch, length, prefix, tokens.device, cache_prefix_mask(given_cache, batch)
            )
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
        chunk_size = self.config.inject_chunk_size if chunk_size is None else chunk_size
        if chunk_size < self.config.min_inject_tokens:
            raise ValueError(f"chunk_size must be >= min_inject_tokens ({self.config.min_inject_tokens}), got {chunk_size}")
        # (text number, chunk): the chunks of one text share its first update's number in the long-term store
        chunks = [
            (text, c) for text, ids in enumerate(self._injection_ids(text_or_ids, tokenizer))
            for c in self._split(ids, chunk_size)
        ]
        show = len(chunks) >= PROGRESS_MIN_CHUNKS if progress is None else progress
        with self._memory_lock:
            before = self._current_state()
            first_update: dict[int, int] = {}
            try:
                with torch.no_grad():
                    for text, chunk in logging.tqdm(chunks, desc="Injecting", unit="chunk", disable=not show):
                        call = first_update.setdefault(text, self.num_injections + 1)
                        new = check_finite_slots(self.new_memory_slots(chunk))
                        state = self._state_after(new, generator, self._take_spare_pool(), call)
                        replaced = self.memory
                        self._set_state(state)
                        del state
                        # A pool between two chunks of this call. (is_sole_reference counts references: keep the
                        # call inline, a helper in between would add one and turn recycling off.)
                        if self._recycles(replaced) and is_sole_reference(replaced):
                            self._spare_pool = replaced
                        del replaced
            except BaseException:
                self._set_state(before)
                raise
            self._remember_undo(before)
        return len(chunks)

    def commit_memory_slots(self, slots: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Write slots [L, k, d] computed by `new_memory_slots` into the pool, as `inject` would (drop rule, undo)."""
        with self._memory_lock:
            before = self._current_state()
            self._set_state(self._state_after(check_finite_slots(slots.detach()), generator))
            self._remember_undo(before)

    def _injection_ids(self, text_or_ids, tokenizer) -> list[torch.Tensor]:
        """Validate and tokenize everything up front (so a bad item fails before memory changes)."""
        if isinstance(text_or_ids, Mapping):  # tokenizer output: each row in order
            return [ids for row in encoding_rows(text_or_ids) for ids in self._injection_ids(row, tokenizer)]
        if isinstance(text_or_ids, str) or (
            isinstance(text_or_ids, (list, tuple)) and text_or_ids and isinstance(text_or_ids[0], str)
        ):
            texts = [text_or_ids] if isinstance(text_or_ids, str) else list(text_or_ids)
            if any(isinstance(t, str) and is_blank_text(t) for t in texts):
                raise ValueError("text is empty or whitespace only: there is nothing to inject")
            if tokenizer is None:
                raise ValueError("inject(text) needs tokenizer=...; or pass token ids")
            items = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"], dtype=torch.long) for t in texts]
        else:
            try:
                ids = torch.as_tensor(text_or_ids)
            except RuntimeError as err:  # e.g. None or dicts among the ids
                raise TypeError(
                    f"inject takes a text, a list of texts or token ids (ints, integer tensor): {err}"
                ) from None
            if ids.numel() == 0:
                raise ValueError("nothing to inject: no token ids (pass a text, a list of texts or token ids)")
            if ids.is_meta or ids.layout != torch.strided:
                kind = "meta" if ids.is_meta else str(ids.layout)
                raise ValueError(f"token ids must be a dense tensor holding data, got a {kind} tensor")
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
            if ids.dim() == 2 and ids.shape[0] != 1:
                raise ValueError(
                    f"inject takes one sequence at a time, got a batch of {ids.shape[0]}; "
                    "pass a list of texts (or call inject per row) to inject them in order"
                )
            if ids.dim() > 2:
                raise ValueError(f"token ids must be 1-D or [1, n], got shape {tuple(ids.shape)}")
            items = [ids.reshape(-1).long()]
        minimum, vocab = self.config.min_inject_tokens, self.config.vocab_size
        for ids in items:
            if ids.numel() < minimum:
                raise ValueError(
                    f"injection has {ids.numel()} tokens; at least min_inject_tokens={minimum} are needed "
                    "(join short texts together, or lower config.min_inject_tokens)"
                )
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab}), got range [{int(ids.min())}, {int(ids.max())}]")
        return items

    def _split(self, ids: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
        """Near-equal chunks of at most `chunk_size` tokens (none shorter than the minimum)."""
        count = -(-ids.numel() // chunk_size)
        return [c[None].to(self.device) for c in torch.tensor_split(ids, count)]

    def write_layout(self, length: int) -> tuple[bool, int, int, bool, int]:
        """The write window for a context of `length` tokens: (bos in prefix, memory slots in prefix, memory slots
        re-processed as queries, add the position embedding, number of new slots).

        Official ("output") rule: window `[bos; last K slots; context]`, queries = the last max(n, K) positions, new
        slots = layer outputs at the last K; the first write into an empty "tile" pool has no bos and no memory.
        "input" rule: only the context tokens are queries and become (min(n, K)) new slots.
        """
        cfg, K, filled = self.config, self.config.num_update_tokens, self.num_filled_slots
        output_rule = cfg.memory_update == "output"
        official_first = filled == 0 and output_rule and cfg.fresh_pool == "tile"
        requeried = min(max(K - length, 0), filled) if output_rule else 0
        add_pos = cfg.positional_emb_on_first_injection if filled == 0 else True
        num_new = min(K, requeried + length)
        return cfg.add_bos_embedding and not official_first, min(K, filled) - requeried, requeried, add_pos, num_new

    def new_memory_slots(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """New memory [L, k, d] written by one context [1, n] (no commit; differentiable for training)."""
        use_bos, prefix_slots, requeried, add_pos, num_new = self.write_layout(input_ids.shape[1])
        bos, pos_emb = self.memory_embeddings()
        N, K = self.config.num_memory_tokens, self.config.num_update_tokens
        layers = self.model.layers
        memory = self.memory
        with self.adapters.use(WRITE):
            hidden = self.model.embed_tokens(input_ids)
            first_slot = N - requeried - prefix_slots
            prefix = [memory[layer, first_slot : N - requeried] for layer in range(len(layers))]
            if use_bos:
                prefix = [torch.cat([bos[i].to(p.device, hidden.dtype), p], dim=0) for i, p in enumerate(prefix)]
            start = prefix[0].shape[0]
            cache = None
            if start:
                # read-only: the window is used once per layer, and a checkpointing replay must see the same prefix
                cache = seeded_cache(self.config, prefix_key_values(layers, self.model.rotary_emb, prefix), 1, True)
            length = requeried + input_ids.shape[1]
            positions = torch.arange(start, start + length, device=hidden.device)[None]
            probe = hidden.new_empty(1, length, hidden.shape[-1])
            mask = create_causal_mask(self.config, probe, None, cache, position_ids=positions)
            rotary = self.model.rotary_emb(probe, positions)
            # Official quirk, kept for parity: with no prefix in the window, the next layer's in-place position
            # embedding add also lands on the recorded output slots.
            aliased_position_emb = add_pos and not start and not requeried
            new_slots = []
            for index, layer in enumerate(layers):
                requery = memory[index, N - requeried :][None].to(hidden.device)
                x = hidden if not requeried else torch.cat([requery, hidden], dim=1)
                if add_pos:
                    K_here = min(K, x.shape[1])
                    x = torch.cat([x[:, : x.shape[1] - K_here], x[:, -K_here:] + pos_emb.to(x.device, x.dtype)], dim=1)
                if self.config.memory_update == "input":
                    new_slots.append(x[0, -num_new:].to(memory.device))
                    if index == len(layers) - 1:
                        break
                out = layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=positions, cache=cache)
                if self.config.memory_update == "output":
                    slot = out[0, -num_new:]
                    if aliased_position_emb and index < len(layers) - 1:
                        slot = slot + pos_emb[0].to(slot.device, slot.dtype)
                    new_slots.append(slot.to(memory.device))
                hidden = out[:, -input_ids.shape[1] :]
        return torch.stack(new_slots)

    def _state_after(
        self, new: torch.Tensor, generator: torch.Generator | None, out: torch.Tensor | None = None, call=None
    ) -> MemoryState:
        """Memory state after committing new slots [L, k, d] (see `memory_state.next_state`)."""
        return next_state(self._current_state(), new, self.config, generator, out, call)

    # ------------------------------------------------------------------ persistence and construction
    def _apply(self, fn, *args, **kwargs):
        self._prefix_kv = self._spare_pool = None
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
        if kwargs.get("push_to_hub"):
            raise ValueError("use model.push_to_hub(repo_id) (it keeps the memory in its own file)")
        with self._memory_lock:  # one memory state: the buffers and the long-term store
            long_term = self._long_term
            state_dict = dict(self.state_dict() if state_dict is None else state_dict)
        state = self._memory_for_save(state_dict, long_term)
        save_weights = super().save_pretrained
        if not kwargs.get("is_main_process", True):
            return save_weights(save_directory, *args, state_dict=state_dict, **kwargs)
        self._save_folder(
            save_directory,
            lambda staging: save_weights(staging, *args, state_dict=state_dict, **kwargs),
            state,
            overwrite_memory,
        )

    @classmethod
    def from_pretrained(cls, *args, allow_other_model: bool = False, **kwargs):
        """`from_pretrained` that checks the memory fully before using it (`MemoryState.load`: complete, finite,
        consistent, its hash, this model's fingerprint unless `allow_other_model=True`), and refuses a memory pool
        whose shape disagrees with the config (or, with `ignore_mismatched_sizes=True`, starts from an empty pool
        instead of reading a re-initialized one)."""
        want_info = kwargs.pop("output_loading_info", False)
        if args and kwargs.get("config") is None:
            cls._refuse_plain_checkpoint(args[0], kwargs)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as err:
            if "mismatched" not in str(err):
                raise
            raise ValueError(
                "the checkpoint's tensors do not have the shapes its config implies (see the load report above). For "
                "`memory` this means num_hidden_layers / num_memory_tokens / hidden_size in config.json disagree with "
                "memory.safetensors: fix the config, or pass ignore_mismatched_sizes=True to start with an empty pool"
            ) from err
        model._reset_missing_adapters(info["missing_keys"])
        if any(key.startswith("memory") for key, *_ in info["mismatched_keys"]):
            logger.warning("memory pool shape differs from the checkpoint: starting with an empty pool")
            model.reset_memory()
        else:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            model._adopt_checkpoint_memory(*checkpoint_memory_file(source, kwargs), allow_other_model)
            if source is not None:
                model._load_long_term_file(source, kwargs)
        model.config.check_long_term_memory()  # fields given to from_pretrained skip the config's own checks
        return (model, info) if want_info else model

    @classmethod
    def _refuse_plain_checkpoint(cls, path_or_repo, kwargs: dict) -> None:
        """A checkpoint of another model type (a plain Llama) would load as an untrained memory model: refuse."""
        lookup = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "gguf_file")
        config, _ = MemoryLlamaConfig.get_config_dict(path_or_repo, **{k: kwargs[k] for k in lookup if k in kwargs})
        model_type = config.get("model_type")
        if model_type != MemoryLlamaConfig.model_type:
            raise ValueError(
                f"{path_or_repo} is a {model_type!r} checkpoint, not MemoryLlama: wrap it with "
                f"{cls.__name__}.from_base(path) (a fresh training-free memory), or convert an official MemoryLLM "
                "checkpoint with `memoryllm-hf convert --official`"
            )

    def _reset_missing_adapters(self, missing_keys: set[str]) -> None:
        """Adapter weights absent from a checkpoint start as fresh (identity) adapters. (They live inside the Llama
        submodel, whose own `_init_weights` does not know them.)"""
        for prefix, module in self.named_modules():
            if isinstance(module, AdapterWeights):
                module.reset([name for name in module if f"{prefix}.{name}" in missing_keys])

    @classmethod
    def from_base(
        cls,
        path_or_repo: str | os.PathLike,
        gguf_file: str | None = None,
        memory_update: str = "input",
        **memory_config,
    ) -> "MemoryLlamaForCausalLM":
        """Wrap any pretrained Llama checkpoint (folder, Hub id, or GGUF via `gguf_file`) with a fresh memory pool.

        Defaults to the training-free "input" update with a "grow" pool, a long-term store of about 1 GiB (bfloat16)
        and retrieval reads (`read_mode="pool"` keeps the official read). `bos_embedding` starts as the base
        model's own hidden states of its BOS token, so reads see the attention sink the model was trained with.
        """
        if "torch_dtype" in memory_config:  # the pre-5 name of `dtype`
            memory_config.setdefault("dtype", memory_config.pop("torch_dtype"))
        load_kwargs = {k: memory_config.pop(k) for k in FROM_BASE_LOAD_KWARGS if k in memory_config}
        if gguf_file:
            load_kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
        source = {"gguf_file": gguf_file} if gguf_file else {"revision": load_kwargs.get("revision")}
        base_config = AutoConfig.from_pretrained(path_or_repo, **source)
        if base_config.model_type not in ("llama", MemoryLlamaConfig.model_type):
            raise ValueError(f"from_base needs a Llama checkpoint, got model_type={base_config.model_type!r}")
        skip = ("model_type", "architectures", "auto_map")
        fields = {k: v for k, v in base_config.to_dict().items() if k not in skip}
        if memory_update == "input":
            # Every context token becomes a slot, so chunks longer than K would lose tokens; and the 16-token
            # minimum of the trained official models has no reason to apply.
            memory_config.setdefault("inject_chunk_size", memory_config.get("num_update_tokens", 16))
            memory_config.setdefault("min_inject_tokens", 4)
            memory_config.setdefault("fresh_pool", "grow")
            # What leaves the pool stays findable: a long-term store of about 1 GiB and retrieval reads.
            if memory_config.get("read_mode", "retrieve") == "retrieve":
                memory_config.setdefault("read_mode", "retrieve")
                memory_config.setdefault("read_tokens", 4 * memory_config.get("num_update_tokens", 16))  # 4 updates
                memory_config.setdefault("retrieval_neighbors", 1)  # and the neighbouring updates of their text
                memory_config.setdefault("long_term_memory_dtype", "bfloat16")
                memory_config.setdefault(
                    "long_term_memory_tokens",
                    default_long_term_tokens(
                        base_config.num_hidden_layers,
                        base_config.hidden_size,
                        memory_config["long_term_memory_dtype"],
                        memory_config.get("num_update_tokens", 16),
                    ),
                )
        config = MemoryLlamaConfig(**{**fields, "memory_update": memory_update, **memory_config})
        # A base checkpoint has no memory and no adapters: transformers' load report would list every adapter weight
        # as missing. It is left out (a filter, not a log level: levels switch on other transformers checks) and
        # replaced by a report of what is not expected.
        report_logger = logging.get_logger("transformers.modeling_utils")
        report_logger.addFilter(_drop_load_report)
        try:
            model, info = cls.from_pretrained(path_or_repo, config=config, output_loading_info=True, **load_kwargs)
        finally:
            report_logger.removeFilter(_drop_load_report)
        missing = sorted(key for key in info["missing_keys"] if ".adapter_" not in key)
        surprises = {"missing": missing, "unexpected": sorted(info["unexpected_keys"])}
        if any(surprises.values()):
            logger.warning(f"from_base({path_or_repo}): weights that do not match a Llama: {surprises}")
        model.bos_from_base_model()
        return model

    @torch.no_grad()
    def bos_from_base_model(self) -> None:
        """Set `bos_embedding[l]` to the input of layer l when the base model reads its BOS token alone."""
        bos, _ = self.memory_embeddings()
        if bos is None or self.config.bos_token_id is None:
            return
        ids = torch.tensor([[self.config.bos_token_id]], device=self.device)
        with self.adapters.use(READ):
            hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states
        bos.copy_(torch.stack([h[0].to(bos.device) for h in hidden[: self.config.num_hidden_layers]]).to(bos.dtype))


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
