"""Training examples: documents from local text/jsonl files split into (contexts, segment).

Every example is a pure function of its index (and the seed), so any rank can compute its share of a step, a
single process can replay what several ranks saw, and resuming needs nothing but the step counter.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


@dataclass
class Example:
    """Contexts to inject (1-D token ids, in order; the segment continues the last one) and the segment to
    predict. `labels` (default: the segment) may hold -100 at positions that are not scored."""

    contexts: list[torch.Tensor]
    segment: torch.Tensor
    labels: torch.Tensor | None = None

    def segment_labels(self) -> torch.Tensor:
        return self.segment if self.labels is None else self.labels


class ExampleSource(Protocol):
    def example(self, index: int) -> Example: ...


def read_documents(files: list[str], text_field: str = "text", group_field: str | None = None) -> list[str]:
    """Texts of the documents in `files`: a .txt file is one document; a .jsonl file gives one document per row,
    or, with `group_field`, one per run of consecutive rows sharing that field (joined with blank lines)."""
    documents: list[str] = []
    for name in files:
        path = Path(name)
        if path.suffix == ".txt":
            documents.append(path.read_text())
            continue
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: training files must be .txt or .jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if any(text_field not in row for row in rows):
            raise ValueError(f"{path}: every row needs the field {text_field!r} (data.text_field)")
        groups: list[tuple[object, list[str]]] = []
        for row in rows:
            key = row.get(group_field) if group_field else object()
            if not groups or groups[-1][0] != key:
                groups.append((key, []))
            groups[-1][1].append(row[text_field])
        documents += ["\n\n".join(texts) for _, texts in groups]
    return documents


def split_document(
    ids: list[int], rng: random.Random, min_chunk: int, max_chunk: int, max_segment: int
) -> tuple[list[list[int]], list[int]] | None:
    """Split one tokenized document into (contexts, segment); None when it is shorter than 2 * min_chunk.

    1. The segment is the last `rng.randint(min_chunk, min(max_segment, n - min_chunk))` tokens.
    2. The tokens before it are cut, from the start, into chunks of `rng.randint(min_chunk, min(max_chunk,
       remaining - min_chunk))` tokens while more than `max_chunk` remain; the rest is the last context.
    Every context therefore has min_chunk..max_chunk tokens, and the last one is directly followed by the segment
    (official v2 `split_sequence`: random [16, 512]-token chunks, the segment is the document's end).
    """
    if len(ids) < 2 * min_chunk:
        return None
    segment_length = rng.randint(min_chunk, min(max_segment, len(ids) - min_chunk))
    head, segment = ids[:-segment_length], ids[-segment_length:]
    contexts = []
    while len(head) > max_chunk:
        length = rng.randint(min_chunk, min(max_chunk, len(head) - min_chunk))
        contexts.append(head[:length])
        head = head[length:]
    contexts.append(head)
    return contexts, segment


class DocumentExamples:
    """Examples from tokenized documents: index i reads document `order[i % n]` of a per-epoch shuffled order and
    splits it with a generator seeded by (seed, i), so the same index always gives the same example."""

    def __init__(self, documents: list[list[int]], seed: int, min_chunk: int, max_chunk: int, max_segment: int):
        self.documents = [d for d in documents if len(d) >= 2 * min_chunk]
        if not self.documents:
            raise ValueError(f"no document has the {2 * min_chunk} tokens needed for one context and a segment")
        self.seed = seed
        self.limits = (min_chunk, max_chunk, max_segment)

    @classmethod
    def from_files(
        cls,
        files: list[str],
        tokenizer,
        seed: int,
        text_field: str = "text",
        group_field: str | None = None,
        min_chunk: int = 16,
        max_chunk: int = 512,
        max_segment: int = 512,
    ) -> "DocumentExamples":
        texts = read_documents(files, text_field, group_field)
        documents = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        return cls(documents, seed, min_chunk, max_chunk, max_segment)

    def __len__(self) -> int:
        return len(self.documents)

    def example(self, index: int) -> Example:
        epoch, position = divmod(index, len(self.documents))
        order = list(range(len(self.documents)))
        random.Random(f"{self.seed}-epoch-{epoch}").shuffle(order)
        rng = random.Random(f"{self.seed}-{index}")
        contexts, segment = split_document(self.documents[order[position]], rng, *self.limits)
        return Example([torch.tensor(c) for c in contexts], torch.tensor(segment))
