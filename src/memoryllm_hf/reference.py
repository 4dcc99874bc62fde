"""Reference MemoryLLM path, written the way the official code works: concatenate the memory hidden states to
every layer input, compute keys/values over the whole sequence and queries over the tokens, with plain eager
attention. Slow on purpose; tests prove the fast path equal to it and benchmarks time it as the official cost.
"""

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from .modeling import MemoryLlamaForCausalLM


def _layer_on_window(layer, window: torch.Tensor, num_queries: int, rotary) -> torch.Tensor:
    """One decoder layer over `window` [1, W, d]; returns outputs of its last `num_queries` positions. Queries see
    every earlier window position (prefix fully, queries causally)."""
    attn = layer.self_attn
    width = window.shape[1]
    first_query = width - num_queries
    normed = layer.input_layernorm(window)
    heads = (1, width, -1, attn.head_dim)
    queries = attn.q_proj(normed[:, first_query:]).view(1, num_queries, -1, attn.head_dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(heads).transpose(1, 2)
    values = attn.v_proj(normed).view(heads).transpose(1, 2)
    cos, sin = rotary(window, torch.arange(width, device=window.device)[None])
    queries, _ = apply_rotary_pos_emb(queries, queries, cos[:, first_query:], sin[:, first_query:])
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
    keys, values = repeat_kv(keys, attn.num_key_value_groups), repeat_kv(values, attn.num_key_value_groups)
    scores = queries @ keys.transpose(2, 3) * attn.scaling
    visible = torch.ones(num_queries, width, dtype=torch.bool, device=window.device).tril(first_query)
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    mixed = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype) @ values
    hidden = window[:, first_query:] + attn.o_proj(mixed.transpose(1, 2).reshape(1, num_queries, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@torch.no_grad()
def reference_logits(model: MemoryLlamaForCausalLM, input_ids: torch.LongTensor) -> torch.Tensor:
    """Logits [1, T, V] of a read: every layer input is `[bos_l; filled memory_l; tokens]`."""
    layers, rotary = model.model.layers, model.model.rotary_emb
    hidden = model.model.embed_tokens(input_ids)
    prefix = model.memory_prefix_hidden() if model.memory_is_initialized else None
    for index, layer in enumerate(layers):
        window = hidden if prefix is None else torch.cat([prefix[index][None].to(hidden.dtype), hidden], dim=1)
        hidden = _layer_on_window(layer, window, hidden.shape[1], rotary)
    return model.lm_head(model.model.norm(hidden))


@torch.no_grad()
def reference_new_memory_slots(model: MemoryLlamaForCausalLM, input_ids: torch.LongTensor) -> torch.Tensor:
    """New slots [L, k, d] of one injection, computed as the official code does: window `[bos_l; memory slots;
    context]`, queries over the last (re-processed slots + context) positions, the position embedding added in place
    to the last K of them, only the context carried to the next layer."""
    length = input_ids.shape[1]
    use_bos, prefix_slots, requeried, add_pos, num_new = model.write_layout(length)
    bos, pos_emb = model.memory_embeddings()
    N, K = model.config.num_memory_tokens, model.config.num_update_tokens
    rotary = model.model.rotary_emb
    output_rule = model.config.memory_update == "output"
    new_slots = []
    with model.adapters.use("write"):
        hidden = model.model.embed_tokens(input_ids)
        for index, layer in enumerate(model.model.layers):
            slots = model.memory[index, N - requeried - prefix_slots :][None]
            parts = ([bos[index][None]] if use_bos else []) + [slots]
            window = torch.cat([*parts, hidden], dim=1) if prefix_slots + requeried or use_bos else hidden
            if add_pos:  # in place, as the official code does (it may alias the last output): last K queries
                window[:, -min(K, requeried + length) :] += pos_emb
            if not output_rule:
                new_slots.append(window[0, -num_new:].clone())
                if index == len(model.model.layers) - 1:
                    break
            out = _layer_on_window(layer, window, requeried + length, rotary)
            if output_rule:
                new_slots.append(out[0, -num_new:])
            hidden = out[:, -length:]
    return torch.stack(new_slots)
