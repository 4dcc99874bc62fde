"""Tokenizer output as `inject` input: `tokenizer(text)` / `tokenizer(texts, padding=True, return_tensors="pt")`."""

from collections.abc import Mapping

import torch


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
