"""Input forms: tokenizer output as `inject` input (`tokenizer(text)` / `tokenizer(texts, padding=True,
return_tensors="pt")`), and the odd inputs `inject` and `generate` refuse with an error that says what to pass (bytes,
lists mixing texts with other things, ids that are only special tokens, an empty prompt)."""

from collections.abc import Mapping

import torch

INJECT_TAKES = (
    "inject takes a text (str), a list of texts, token ids (a list of ints or an integer tensor) or tokenizer output"
)


def check_injection_input(value) -> None:
    """Raise TypeError for inputs `inject` must not guess at: bytes (byte values are not token ids), lists that mix
    texts with other things, None among the items."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{INJECT_TAKES}; got {type(value).__name__}: decode it first (data.decode('utf-8'))")
    if not isinstance(value, (list, tuple)):
        return
    kinds = {"text" if isinstance(item, str) else "other" for item in value}
    for index, item in enumerate(value):
        if item is None or isinstance(item, (bytes, bytearray, memoryview)) or (
            len(kinds) > 1 and not isinstance(item, str)
        ):
            what = "texts and token ids mixed" if item is not None and len(kinds) > 1 else type(item).__name__
            raise TypeError(f"{INJECT_TAKES}; item {index} of the list is {item!r:.40} ({what}): pass only texts or "
                            "only token ids")


def special_ids(config, tokenizer=None) -> set[int]:
    """Ids of the tokens that carry no text: padding, begin and end of text (the config's and the tokenizer's; an
    unknown-word token stands for text and is not one of them)."""
    ids = set()
    for source in (config, tokenizer):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids


def refuse_special_only(ids: torch.Tensor, special: set[int]) -> None:
    """An injection of only special tokens (padding, end of text) holds nothing to remember: refused like blank text."""
    if ids.numel() and special and set(ids.unique().tolist()) <= special:
        raise ValueError(
            f"the injection holds only special tokens (ids {sorted(set(ids.unique().tolist()))}: padding, begin or end "
            "of text): there is nothing to inject; pass the text's own tokens"
        )


def refuse_empty_prompt(tokens: torch.Tensor | None) -> None:
    """`generate` needs at least one prompt token to continue from."""
    if tokens is not None and tokens.dim() >= 2 and tokens.shape[1] == 0:
        raise ValueError(
            "generate got an empty prompt (0 tokens): pass at least one token, e.g. the tokenizer's bos token or "
            "tokenizer.apply_chat_template(messages, add_generation_prompt=True)"
        )


def encoding_rows(encoding: Mapping) -> list[torch.Tensor]:
    """The token ids of each row of a tokenizer output (a `BatchEncoding` or a dict with `input_ids`), padding
    (where `attention_mask` is 0) removed. The ids are taken as they are: special tokens the tokenizer added stay."""
    if "input_ids" not in encoding:
        raise ValueError(f"inject takes tokenizer output with 'input_ids'; got keys {sorted(encoding)}")
    ids, mask = encoding["input_ids"], encoding.get("attention_mask")
    rows = _rows(ids)
    masks = _rows(mask) if mask is not None else [None] * len(rows)
    if len(masks) != len(rows):
        raise ValueError(f"attention_mask has {len(masks)} rows but input_ids has {len(rows)}")
    out = []
    for row, row_mask in zip(rows, masks, strict=True):
        row = torch.as_tensor(row)
        if row_mask is not None:
            row_mask = torch.as_tensor(row_mask)
            if row_mask.shape != row.shape:
                raise ValueError(f"attention_mask row of shape {tuple(row_mask.shape)} for ids of {tuple(row.shape)}")
            row = row[row_mask.bool()]
        out.append(row)
    return out


def _rows(value) -> list:
    """Rows of a [B, n] tensor / list of lists, or the single row of a 1-D one."""
    if isinstance(value, torch.Tensor):
        return list(value) if value.dim() == 2 else [value]
    value = list(value)
    return value if value and isinstance(value[0], (list, tuple, torch.Tensor)) else [value]
