"""M+ on MemoryLlama: the commit that feeds the long-term memory, and the read that retrieves from it.

A model whose config has a retriever (`retriever_size` > 0, e.g. a converted M+ checkpoint) keeps an `MPlusMemory`
as its long-term memory (part of every memory state, saved in the memory's file group) and, with
`read_mode="mplus"`, reads `[bos; retrieved; pool; tokens]` (see `mplus_read`). The pool's drop rule stays
`memory_state.next_state`: it is replayed on slot numbers to learn which slots left (as the evaluation replay does).
"""

import dataclasses

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .memory_adapters import READ
from .memory_prefix import cache_prefix_length, extend_attention_mask, record_prefix
from .memory_state import MemoryState
from .memory_transition import next_state
from .mplus_memory import MPlusMemory, after_commit, empty_long_term
from .mplus_read import MPlusRetrieval, mplus_prefix


def commit_sources(state: MemoryState, num_new: int, config, generator: torch.Generator | None) -> torch.Tensor:
    """Where every pool slot comes from after committing `num_new` slots [L, N]: >= 0 that old slot, -(j+1) new slot
    j. Runs `next_state` on slot numbers with a copy of the drawing generator (the real commit draws the same)."""
    L, N = state.memory.shape[:2]
    numbers = torch.arange(N, dtype=torch.float64).expand(L, N)[..., None]
    new = -(1.0 + torch.arange(num_new, dtype=torch.float64)).expand(L, num_new)[..., None]
    twin = None
    if generator is not None:
        twin = torch.Generator()
        twin.set_state(generator.get_state())
    probe = dataclasses.replace(state, memory=numbers, long_term=())
    return next_state(probe, new, config, twin, with_long_term=False).memory[..., 0].long()


def dropped_slots(sources: torch.Tensor, filled: int) -> torch.Tensor:
    """The filled old slots [L, q] (ascending) that `sources` [L, N] no longer holds."""
    L, N = sources.shape
    present = torch.zeros(L, N + 1, dtype=torch.bool)
    present.scatter_(1, torch.where(sources >= 0, sources, N).cpu(), True)
    present = present[:, :N]
    present[:, : N - filled] = True  # empty slots hold nothing to keep
    return (~present).nonzero()[:, 1].view(L, -1)


def mplus_pass(model, input_ids, attention_mask, inputs_embeds, finish: bool):
    """`mplus_read.mplus_prefix` on `model`'s parts for a prompt batch (read adapter, the pool's cached keys/values)."""
    if not model.is_mplus:
        raise ValueError("this model has no M+ retriever (retriever_size=0): convert an M+ checkpoint")
    embeds = inputs_embeds if input_ids is None else model.model.embed_tokens(input_ids)
    head = int(model.config.add_bos_embedding)
    with model.adapters.use(READ):
        memory_kv = model.memory_key_values()  # [bos; pool] at positions 0.., cached until the memory changes
        return mplus_prefix(
            model.model, model.retriever, model.long_term_memory, model.config, embeds, attention_mask, memory_kv, head,
            finish,
        )


class MPlusMixin:
    """M+ parts of MemoryLlama (relies on the model's `retriever`, `memory`, `model`, `adapters`, `memory_embeddings`,
    `config`, `long_term_memory`)."""

    @property
    def is_mplus(self) -> bool:
        """Whether this model has the M+ retriever (and so an M+ long-term memory)."""
        return getattr(self, "retriever", None) is not None

    def empty_long_term_memory(self):
        """The long-term memory of an empty model: an empty `MPlusMemory` for M+ models, else an empty store."""
        return empty_long_term(self.config, self.memory.dtype)

    def plain_mplus_read(self, cache, attention_mask, position_ids, labels, memory_slots, kwargs, use_memory) -> bool:
        """Whether a forward is a plain fresh M+ read, which `mplus_forward` runs in one pass (the others seed a
        cache with the retrieval pass and read it with the stock forward)."""
        plain = cache is None and labels is None and position_ids is None and not kwargs and not self.training
        plain = plain and self.can_generate()  # the head-less AutoModel reads through the seeded cache
        return (plain and memory_slots is None and self.read_mode == "mplus" and self.reads_memory(use_memory)
                and (attention_mask is None or attention_mask.dim() == 2))

    def mplus_state_after(self, state: MemoryState, new: torch.Tensor, generator, out=None, call=None) -> MemoryState:
        """The memory after committing new slots [L, k, d] on an M+ model: the pool as `next_state` commits it, and
        the long-term memory after the slots it dropped (`mplus_memory.after_commit`)."""
        memory = state.long_term
        if not isinstance(memory, MPlusMemory):
            raise TypeError("an M+ model's memory state must hold an MPlusMemory as its long-term memory")
        sources = commit_sources(state, new.shape[1], self.config, generator)
        dropped = dropped_slots(sources, int(state.filled))
        leaving = torch.stack([state.memory[layer, rows.to(state.memory.device)] for layer, rows in enumerate(dropped)])
        keys = self.retriever.slot_keys(self.model.layers, leaving)
        after = next_state(state, new, self.config, generator, out, call, with_long_term=False)
        long_term = after_commit(memory, sources, dropped, leaving, keys, new.shape[1], self.config)
        return dataclasses.replace(after, long_term=long_term)

    @torch.no_grad()
    def mplus_retrieval(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[list, MPlusRetrieval]:
        """(per-layer prefix keys/values, what every layer retrieves) for a prompt batch: the first half of an M+
        read. `attention_mask` [B, T] covers the tokens."""
        prefix_kv, record, _, _ = mplus_pass(self, input_ids, attention_mask, inputs_embeds, finish=False)
        return prefix_kv, record

    @torch.no_grad()
    def mplus_forward(self, input_ids, attention_mask, inputs_embeds, logits_to_keep=0, use_cache=None):
        """A whole M+ read in one pass (the retrieval pass runs the last layer too): logits of the kept positions and
        the cache `[prefix; prompt]` (None with `use_cache=False`). What `forward` does for a plain fresh read."""
        if attention_mask is not None and attention_mask.shape[-1] != (input_ids if input_ids is not None else
                                                                        inputs_embeds).shape[1]:
            raise ValueError("with read_mode='mplus' the attention_mask covers the tokens only")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        prefix_kv, record, cache, hidden = mplus_pass(self, input_ids, attention_mask, inputs_embeds, finish=True)
        self.last_retrieval = record
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(self.model.norm(hidden)[:, kept])
        return CausalLMOutputWithPast(logits=logits, cache=record_prefix(cache, prefix_kv) if use_cache else None)

    @torch.no_grad()
    def mplus_generation_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: int):
        """(cache, attention mask over prefix + tokens) to start `generate` from: one M+ pass over the prompt, its
        cache without the last token (which `generate`'s first step feeds), each row repeated for beams/samples."""
        cache = self.mplus_forward(input_ids, attention_mask, None, logits_to_keep=1, use_cache=True).cache
        cache.crop(-1)
        if rows != input_ids.shape[0]:
            cache.batch_repeat_interleave(rows // input_ids.shape[0])
        batch, length = input_ids.shape
        mask = extend_attention_mask(attention_mask, batch, length, cache_prefix_length(cache), input_ids.device)
        return cache, mask
