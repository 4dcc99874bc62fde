"""What `inject` accepts and how it cuts it: the injected-text checks, the chunking into memory updates and the call
numbers of the long-term store (also used by the evaluation replay, which must make the same updates)."""

import unicodedata
from collections.abc import Mapping

import torch

from .memory_inputs import check_injection_input, encoding_rows, refuse_special_only, special_ids


def is_blank_text(text: str) -> bool:
    """True for text with nothing to inject: empty, whitespace, or only invisible format characters (zero-width)."""
    return not "".join(ch for ch in text if unicodedata.category(ch) != "Cf").strip()


def check_length(num_tokens: int, minimum: int, what: str = "injection") -> None:
    """Refuse an injection shorter than the model's `min_inject_tokens`."""
    if num_tokens < minimum:
        raise ValueError(
            f"{what} has {num_tokens} tokens; at least min_inject_tokens={minimum} are needed "
            "(join short texts together, or lower config.min_inject_tokens)"
        )


def injection_ids(
    text_or_ids, tokenizer, min_tokens: int, vocab_size: int, special: set[int] = frozenset()
) -> list[torch.Tensor]:
    """Validate and tokenize everything `inject` was given, up front (so a bad item fails before memory changes):
    one 1-D id tensor per text (a text, a list of texts, token ids, or tokenizer output: each row in order). Odd
    inputs (bytes, lists mixing texts with other things) and texts of only `special` ids are refused."""
    check_injection_input(text_or_ids)
    if isinstance(text_or_ids, Mapping):  # tokenizer output: each row in order
        rows = encoding_rows(text_or_ids)
        return [ids for row in rows for ids in injection_ids(row, tokenizer, min_tokens, vocab_size, special)]
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
    for ids in items:
        check_length(ids.numel(), min_tokens)
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"token ids must be in [0, {vocab_size}), got range [{int(ids.min())}, {int(ids.max())}]")
        refuse_special_only(ids, special)
    return items


def split_ids(ids: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """The memory updates of one text [n]: near-equal chunks [1, m] of at most `chunk_size` tokens."""
    count = -(-ids.numel() // chunk_size)
    return [chunk[None] for chunk in torch.tensor_split(ids.reshape(-1), count)]


class CallNumbers:
    """The long-term store's call number of consecutive updates: the updates of one text (consecutive, same text
    key) share the injection number of the text's first update."""

    def __init__(self):
        self.text: object = None
        self.call: int | None = None

    def __call__(self, text, injection: int) -> int:
        """The call number of update `injection` (its 1-based number) of text `text`."""
        if self.call is None or text != self.text:
            self.text, self.call = text, injection
        return self.call


def injection_chunks(config, text_or_ids, tokenizer, chunk_size: int | None, device) -> list[tuple[int, torch.Tensor]]:
    """`inject`'s input checked and cut into updates: `(text number, chunk [n] on device)` in order (the chunks of
    one text share its first update's number in the long-term store); `config`'s settings checked first (set on
    `model.config` since?), so nothing is written when they are not usable."""
    config.check_memory_settings()
    chunk_size = config.inject_chunk_size if chunk_size is None else chunk_size
    if chunk_size < config.min_inject_tokens:
        raise ValueError(f"chunk_size must be >= min_inject_tokens ({config.min_inject_tokens}), got {chunk_size}")
    special = special_ids(config, tokenizer)
    items = injection_ids(text_or_ids, tokenizer, config.min_inject_tokens, config.vocab_size, special)
    return [(text, c.to(device)) for text, ids in enumerate(items) for c in split_ids(ids, chunk_size)]
