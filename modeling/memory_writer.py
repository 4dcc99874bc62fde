"""Writing: the new memory slots one context produces (the write window and its forward through the layers).

Official ("output") rule: each layer sees `[bos_l; last K slots; context]` and its outputs at the last K positions
are the new slots; training-free ("input") rule: the layer inputs of the context tokens are the new slots. Which
slots they replace is the drop rule (`memory_pool`, `memory_transition`).
"""

import torch
from transformers.masking_utils import create_causal_mask

from .memory_adapters import WRITE
from .memory_prefix import prefix_key_values, seeded_cache


def write_layout(config, filled: int, length: int) -> tuple[bool, int, int, bool, int]:
    """The write window for a context of `length` tokens into a pool with `filled` slots: (bos in prefix, memory
    slots in prefix, memory slots re-processed as queries, add the position embedding, number of new slots).

    Official ("output") rule: window `[bos; last K slots; context]`, queries = the last max(n, K) positions, new
    slots = layer outputs at the last K; the first write into an empty "tile" pool has no bos and no memory.
    "input" rule: only the context tokens are queries and become (min(n, K)) new slots.
    """
    cfg, K = config, config.num_update_tokens
    output_rule = cfg.memory_update == "output"
    official_first = filled == 0 and output_rule and cfg.fresh_pool == "tile"
    requeried = min(max(K - length, 0), filled) if output_rule else 0
    add_pos = cfg.positional_emb_on_first_injection if filled == 0 else True
    num_new = min(K, requeried + length)
    return cfg.add_bos_embedding and not official_first, min(K, filled) - requeried, requeried, add_pos, num_new


def new_memory_slots(model, input_ids: torch.LongTensor) -> torch.Tensor:
    """New memory [L, k, d] that `model` writes for one context [1, n] (no commit; differentiable for training)."""
    use_bos, prefix_slots, requeried, add_pos, num_new = model.write_layout(input_ids.shape[1])
    bos, pos_emb = model.memory_embeddings()
    N, K = model.config.num_memory_tokens, model.config.num_update_tokens
    layers = model.model.layers
    memory = model.memory
    with model.adapters.use(WRITE):
        hidden = model.model.embed_tokens(input_ids)
        first_slot = N - requeried - prefix_slots
        prefix = [memory[layer, first_slot : N - requeried] for layer in range(len(layers))]
        if use_bos:
            prefix = [torch.cat([bos[i].to(p.device, hidden.dtype), p], dim=0) for i, p in enumerate(prefix)]
        start = prefix[0].shape[0]
        cache = None
        if start:
            # read-only: the window is used once per layer, and a checkpointing replay must see the same prefix
            cache = seeded_cache(model.config, prefix_key_values(layers, model.model.rotary_emb, prefix), 1, True)
        length = requeried + input_ids.shape[1]
        positions = torch.arange(start, start + length, device=hidden.device)[None]
        probe = hidden.new_empty(1, length, hidden.shape[-1])
        mask = create_causal_mask(model.config, probe, None, cache, position_ids=positions)
        rotary = model.model.rotary_emb(probe, positions)
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
            if model.config.memory_update == "input":
                new_slots.append(x[0, -num_new:].to(memory.device))
                if index == len(layers) - 1:
                    break
            out = layer(x, attention_mask=mask, position_embeddings=rotary, position_ids=positions, cache=cache)
            if model.config.memory_update == "output":
                slot = out[0, -num_new:]
                if aliased_position_emb and index < len(layers) - 1:
                    slot = slot + pos_emb[0].to(slot.device, slot.dtype)
                new_slots.append(slot.to(memory.device))
            hidden = out[:, -input_ids.shape[1] :]
    return torch.stack(new_slots)
