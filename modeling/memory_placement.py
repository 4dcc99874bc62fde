"""Where a read puts the memory: before the prompt, or where the user's message starts.

`read_placement="prefix"` (the official read, what the trained checkpoints saw): every layer reads
`[memory; prompt]`. `read_placement="user_turn"` (the `from_base` default for a tokenizer with a chat template): each
row reads `[the template's text before the user's content; memory; the rest]`, so an instruct model meets the memory
where it would meet a passage pasted into its user turn (system prompt and user header first). The memory is the read
mode's prefix without its bos slot (the template's first token is the attention sink there).

How it is done, with transformers' own cache and masks (no change to Llama):
* the header ends after the last occurrence of the template's user-turn marker in a row (`user_turn_marker`, from the
  tokenizer's chat template; `marker_split`); a row without it (plain text) keeps the prefix read;
* the memory keys are rotated to the positions right after the row's header (`place_prefix`), the bos column is
  hidden, so the cache still starts with the memory and decoding needs nothing new (a generated token's position is
  its count of visible memory and tokens before it, as for the prefix read);
* only the prompt's first forward (the prefill) differs: the header's queries must not see the memory, and the header
  takes the positions before it (`read_split_mask_function` through `create_causal_mask`, `placed_positions`). The
  cache records the split (`record_read_split`) until that forward has run (`pending_read_split`).
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from transformers.masking_utils import create_causal_mask, create_masks_for_generate
from transformers.utils.generic import is_flash_attention_requested

from .memory_prefix import PrefixKV, cache_prefix_length, cache_prefix_mask, record_prefix, seeded_cache
from .shared_prefix_attention import SharedPrefixCache, shares_prefix

# The cache attribute holding each row's split column (tokens before it are read before the memory).
READ_SPLIT_ATTRIBUTE = "memory_read_split"
# Stands for the user's message when the chat template is rendered (letters only: it never merges with the header).
SENTINEL = "Qzxv7MemoryReadSentinel7vxzQ"


def user_turn_marker(tokenizer) -> list[int] | None:
    """The token ids that open a user message in `tokenizer`'s chat template (what the template puts right before the
    user's content whatever came before: the longest common token suffix of the headers of a first user turn, one
    after a system prompt, one after an assistant turn), or None: no chat template, no marker it always writes, or one
    with the unknown token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = {"role": "user", "content": SENTINEL}
    conversations = (
        [user],
        [{"role": "system", "content": "Be brief."}, user],
        [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi."}, user],
    )
    heads = []
    for index, messages in enumerate(conversations):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # a template may refuse a conversation shape (e.g. no system turn); the first must render
            if index == 0:
                return None
            continue
        if not isinstance(text, str) or text.count(SENTINEL) != 1:
            return None
        head_text = text.split(SENTINEL)[0]
        head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        if list(whole[: len(head)]) != list(head):  # the header's last token would merge with the user's text
            return None
        heads.append(list(head))
    marker: list[int] = []
    while all(len(head) > len(marker) for head in heads) and len({head[-len(marker) - 1] for head in heads}) == 1:
        marker.insert(0, heads[0][-len(marker) - 1])
    if getattr(tokenizer, "unk_token_id", None) in marker:  # the tokenizer cannot spell the header
        return None
    return marker or None


def base_tokenizer(path_or_repo, options: dict):
    """The tokenizer saved with a base checkpoint (loaded with `options`' revision / gguf_file / token / cache_dir /
    local_files_only; the others are ignored), or None when it has none that loads."""
    from transformers import AutoTokenizer

    names = ("revision", "gguf_file", "token", "cache_dir", "local_files_only")
    try:
        return AutoTokenizer.from_pretrained(
            path_or_repo, **{k: options[k] for k in names if options.get(k) is not None}
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def placement_defaults(memory_config: dict, tokenizer, path_or_repo, options: dict) -> None:
    """`from_base`'s placement: reads in the user turn when the tokenizer (given, or the checkpoint's, loaded with
    `options`' revision / gguf_file / token / cache_dir / local_files_only) has a chat template, unless
    `read_placement` or `user_turn_marker` is given."""
    if memory_config.get("read_placement", "user_turn") != "user_turn" or "user_turn_marker" in memory_config:
        return
    if tokenizer is None:
        tokenizer = base_tokenizer(path_or_repo, options)
    marker = user_turn_marker(tokenizer)
    if marker is not None:
        memory_config.update(read_placement="user_turn", user_turn_marker=marker)
    elif memory_config.get("read_placement") == "user_turn":
        raise ValueError(
            f"read_placement='user_turn' needs a tokenizer with a chat template; {path_or_repo} has none "
            "(pass tokenizer=..., user_turn_marker=[...], or read_placement='prefix')"
        )


class PrefixPlacement:
    """`read_placement="prefix"` (the official read): the memory before the whole prompt."""

    @staticmethod
    def check_config(config) -> None:
        """Works with every configuration."""

    @staticmethod
    def split(config, input_ids, attention_mask) -> None:
        return None


class UserTurnPlacement:
    """`read_placement="user_turn"`: the memory after the last user-turn marker of each row (plain text: prefix)."""

    @staticmethod
    def check_config(config) -> None:
        marker = config.user_turn_marker
        if marker is None:
            raise ValueError(
                "read_placement='user_turn' needs user_turn_marker, the token ids that open a user message in the "
                "chat template (memory_placement.user_turn_marker(tokenizer) finds them), or read_placement='prefix'"
            )
        if not isinstance(marker, (list, tuple)) or not marker or not all(type(i) is int for i in marker):
            raise ValueError(f"user_turn_marker must be a non-empty list of token ids, got {marker!r}")

    @staticmethod
    def split(config, input_ids, attention_mask) -> torch.Tensor | None:
        if input_ids is None:  # embeddings only: no marker to find
            return None
        split = marker_split(input_ids, attention_mask, config.user_turn_marker)
        return split if bool(split.any()) else None


# Where a read puts the memory (`config.read_placement`): each entry checks the config and says, per prompt row, the
# column the memory is read before (None: every row reads it as a prefix). It composes with every read mode.
PLACEMENTS = {
    "prefix": PrefixPlacement,
    "user_turn": UserTurnPlacement,
}


def read_split(config, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's split column under `config.read_placement`, or None when every row reads the memory as a prefix."""
    return PLACEMENTS[config.read_placement].split(config, input_ids, attention_mask)


def check_token_mask(attention_mask: torch.Tensor | None, length: int) -> None:
    """Reads whose prefix differs per row take a 2-D mask over the `length` tokens only."""
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[1] != length):
        raise ValueError(
            f"with rows reading different memory prefixes (read_mode='retrieve', or a read placed in the user turn) "
            f"the attention_mask covers the tokens only: expected [batch, {length}], got {tuple(attention_mask.shape)}"
        )


def marker_split(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, marker: list[int]) -> torch.Tensor:
    """Per row of `input_ids` [B, T], the column after the last occurrence of `marker` among the row's real tokens
    (`attention_mask` 1), or 0 where it does not occur (the row keeps the prefix read). [B] long."""
    batch, length = input_ids.shape
    width = len(marker)
    if width == 0 or length < width:
        return torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    pattern = torch.tensor(marker, dtype=input_ids.dtype, device=input_ids.device)
    hits = (input_ids.unfold(1, width, 1) == pattern).all(-1)  # [B, T - width + 1]: a window starting there matches
    if attention_mask is not None:
        hits &= attention_mask.to(input_ids.device).bool().unfold(1, width, 1).all(-1)
    ends = torch.arange(width, length + 1, device=input_ids.device)
    return torch.where(hits, ends, 0).amax(dim=1)


def header_lengths(split: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Real tokens before each row's split column ([B] long; 0: the prefix read)."""
    if attention_mask is None:
        return split.clone()
    counts = torch.nn.functional.pad(attention_mask.long().cumsum(1), (1, 0))
    return counts.gather(1, split[:, None].to(counts.device))[:, 0].to(split.device)


def shift_keys(prefix_kv: PrefixKV, rotary_emb: nn.Module, shift: torch.Tensor) -> PrefixKV:
    """`prefix_kv` with every key moved `shift` [b] positions on (RoPE: a rotation by the angle of position `shift`,
    whatever position the key was rotated to before). Keys of batch 1 with b rows become b rows."""
    keys = prefix_kv[0][0]
    cos, sin = rotary_emb(keys.float(), shift[:, None].to(keys.device))  # [b, 1, head_dim], float32
    scale = getattr(rotary_emb, "attention_scaling", 1.0)  # applied once already, when the keys were rotated
    cos, sin = (cos / scale)[:, None], (sin / scale)[:, None]
    out = []
    for k, v in prefix_kv:
        if k.device != cos.device:
            cos, sin = cos.to(k.device), sin.to(k.device)
        moved = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
        out.append((moved.contiguous(), v.expand(cos.shape[0], -1, -1, -1).contiguous()))
    return out


def place_prefix(
    prefix_kv: PrefixKV,
    prefix_mask: torch.Tensor | None,
    rotary_emb: nn.Module,
    header: torch.Tensor,
    bos_columns: int,
) -> tuple[PrefixKV, torch.Tensor | None]:
    """A read mode's prefix (keys/values [1 or B, kv, P, d], each row's real columns at positions 0.. and, left-padded,
    `prefix_mask` [B, P] or None) placed after each row's `header` [B] tokens: for rows with a header, the first
    `bos_columns` real columns are hidden and the others move to positions header, header + 1, ...; rows without one
    keep the prefix read. Columns no row reads are dropped; the mask is None when every row reads every column."""
    placed = header > 0
    if not bool(placed.any()):
        return prefix_kv, prefix_mask
    batch, length = header.shape[0], prefix_kv[0][0].shape[2]
    device = prefix_kv[0][0].device
    mask = torch.ones(batch, length, dtype=torch.long, device=device) if prefix_mask is None else prefix_mask.clone()
    placed = placed.to(device)
    if bos_columns:
        first = mask.cumsum(1)  # the n-th real column of a row has n here
        mask = mask.masked_fill(placed[:, None] & (first <= bos_columns) & (mask > 0), 0)
    shift = torch.where(placed, header.to(device) - bos_columns, 0)
    if prefix_kv[0][0].shape[0] == 1 and bool((shift == shift[0]).all()):
        prefix_kv = shift_keys(prefix_kv, rotary_emb, shift[:1])
    else:
        prefix_kv = shift_keys(prefix_kv, rotary_emb, shift) if bool((shift != 0).any()) else prefix_kv
    kept = mask.bool().any(0)
    if not bool(kept.all()):
        prefix_kv = [(k[:, :, kept].contiguous(), v[:, :, kept].contiguous()) for k, v in prefix_kv]
        mask = mask[:, kept]
    return prefix_kv, None if bool(mask.all()) else mask


def placed_read(model, prefix_kv, prefix_mask, input_ids, attention_mask, split, rows, read_only, max_cache_len):
    """(cache, attention mask [B, prefix + tokens]) of a read placed after each row's header: a read mode's prefix
    (`prefix_kv` [1 or B, kv, P, d] at positions 0.., `prefix_mask` [B, P] or None) moved there (`place_prefix`), for
    `rows` cache rows (beams repeat each row), marked with the rows' split columns for the prefill."""
    batch, length = input_ids.shape
    check_token_mask(attention_mask, length)
    if is_flash_attention_requested(model.config):
        raise ValueError(
            "read_placement='user_turn' hides the memory from the prompt's header with an attention mask, which "
            "flash attention cannot take: use attn_implementation sdpa, eager or flex_attention, or "
            "read_placement='prefix'"
        )
    header = header_lengths(split, attention_mask)
    bos_columns = int(model.config.add_bos_embedding)
    prefix_kv, prefix_mask = place_prefix(prefix_kv, prefix_mask, model.model.rotary_emb, header, bos_columns)
    repeat = rows // batch
    if repeat > 1:  # beams / returned sequences: each row repeated
        if prefix_kv[0][0].shape[0] > 1:
            prefix_kv = [(k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)) for k, v in prefix_kv]
        split = split.repeat_interleave(repeat, 0)
    prefix_length = prefix_kv[0][0].shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
    columns = torch.ones(batch, prefix_length, dtype=attention_mask.dtype, device=attention_mask.device)
    if prefix_mask is not None:
        columns = prefix_mask.to(attention_mask.device, attention_mask.dtype)
        prefix_mask = prefix_mask.repeat_interleave(repeat, 0)
    static = None if max_cache_len is None else prefix_length + max_cache_len
    shared = model.share_memory_prefix and not read_only and not model.training and prefix_mask is None
    if shared and static is None and prefix_kv[0][0].shape[0] == 1 and shares_prefix(model.config, rows):
        cache = record_prefix(SharedPrefixCache(prefix_kv), prefix_kv)
    else:
        cache = seeded_cache(model.config, prefix_kv, rows, read_only, static, prefix_mask)
    return record_read_split(cache, split), torch.cat([columns, attention_mask], dim=1)


def read_split_mask_function(prefix_length: int, split: torch.Tensor) -> Callable:
    """`and_mask_function` (transformers' `create_causal_mask`) of a placed prefill: the memory (cache columns before
    `prefix_length`) is hidden from the queries before each row's `split` column of the tokens."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx >= prefix_length) | (q_idx >= prefix_length + split[batch_idx])

    return inner


def placed_positions(position_ids: torch.Tensor, split: torch.Tensor, prefix_count: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] of a placed prefill from those of the prefix read (memory first: every real token counts the
    `prefix_count` [B] memory columns its row reads): tokens before the row's `split` column come before the memory."""
    columns = torch.arange(position_ids.shape[-1], device=position_ids.device)
    before = columns[None] < split[:, None].to(position_ids.device)
    return (position_ids - before * prefix_count[:, None].to(position_ids.device)).clamp(min=0)


def record_read_split(cache, split: torch.Tensor):
    """Mark `cache` (just seeded with a placed prefix) with each row's split column, for the prompt's first forward."""
    setattr(cache, READ_SPLIT_ATTRIBUTE, split)
    return cache


def pending_read_split(cache) -> torch.Tensor | None:
    """The rows' split columns while `cache` holds its placed memory prefix and no token yet (the prefill), else
    None."""
    split = getattr(cache, READ_SPLIT_ATTRIBUTE, None) if cache is not None else None
    if split is None or int(cache.get_seq_length()) != cache_prefix_length(cache):
        return None
    return split


def placed_prefill(config, cache, attention_mask, position_ids, tokens: torch.Tensor, dtype):
    """(attention mask, position ids) of a forward over `cache` [B, T tokens]: unchanged, except in the prefill of a
    placed read (see `pending_read_split`), where the header's queries do not see the memory and the header takes the
    positions before it. `attention_mask`: the 2-D mask over memory + tokens (None: all ones), or a 4-D mask already
    made for this prefill (static caches: `generate` makes it with `placed_generate_masks`); `position_ids`: those
    of the prefix read (None: from the mask)."""
    split = pending_read_split(cache)
    if split is None:
        return attention_mask, position_ids
    (batch, length), device = tokens.shape[:2], tokens.device
    prefix = cache_prefix_length(cache)
    prefix_mask = cache_prefix_mask(cache, batch)
    if prefix_mask is None:
        prefix_count = torch.full((batch,), prefix, dtype=torch.long, device=device)
    else:
        prefix_count = prefix_mask.long().sum(1).to(device)
    if attention_mask is None:
        attention_mask = torch.ones(batch, prefix + length, dtype=torch.long, device=device)
    if position_ids is None:
        if attention_mask.dim() != 2:
            raise ValueError("a 4-D attention_mask for a memory read placed in the user turn needs position_ids")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    position_ids = placed_positions(position_ids.expand(batch, -1), split, prefix_count)
    if attention_mask.dim() == 2:
        probe = torch.empty(batch, length, 0, dtype=dtype, device=device)
        function = read_split_mask_function(prefix, split.to(device))
        attention_mask = create_causal_mask(
            config, probe, attention_mask, cache, position_ids, and_mask_function=function
        )
    return attention_mask, position_ids


def placed_generate_masks(config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
    """transformers' `create_masks_for_generate` (what `generate` calls for static caches), hiding a memory placed in
    the user turn from the header's queries in the prefill."""
    split = pending_read_split(cache)
    if split is not None:
        kwargs["and_mask_function"] = read_split_mask_function(cache_prefix_length(cache), split)
    return create_masks_for_generate(config, inputs_embeds, attention_mask, cache, position_ids, **kwargs)
