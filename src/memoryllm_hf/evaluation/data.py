"""Readers of the evaluation data (one JSON object per line; see the data folder's README) with content hashes."""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# dataset -> (examples file, unrelated-texts file or None)
DATASET_FILES = {
    "squad": ("squad_qa.jsonl", "squad_paragraphs.jsonl"),
    "nq": ("nq_qa.jsonl", "nq_passages.jsonl"),
    "counterfact": ("counterfact.jsonl", None),
    "zsre": ("zsre.jsonl", None),
    "hotpotqa": ("hotpotqa.jsonl", None),
}
# Field naming the source document of a QA example / unrelated text (an unrelated text never shares it).
SOURCE_FIELD = {"squad": "article", "nq": "title"}
DATA_ENV = "MEMORYLLM_HF_DATA"


def default_data_dir() -> str:
    """$MEMORYLLM_HF_DATA, else `../shared/data` (the project layout)."""
    return os.environ.get(DATA_ENV, os.path.join("..", "shared", "data"))


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


@dataclass
class EvalData:
    """Examples (first `limit` rows, file order), unrelated texts, and the hashes of the files they came from."""

    dataset: str
    examples: list[dict]
    unrelated: list[dict] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)

    def info(self) -> dict:
        ids = [str(example.get("id", example.get("case_id"))) for example in self.examples]
        return {
            "dataset": self.dataset,
            "num_examples": len(self.examples),
            "file_sha256": self.hashes,
            "example_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        }


def load_data(data_dir: str | os.PathLike, dataset: str, limit: int | None = None) -> EvalData:
    """Read a dataset; raises a clear error when the folder or a file is missing."""
    if dataset not in DATASET_FILES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_FILES)}")
    folder = Path(data_dir)
    examples_file, unrelated_file = DATASET_FILES[dataset]
    names = [name for name in (examples_file, unrelated_file) if name]
    missing = [name for name in names if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} not found in {folder}; pass --data FOLDER (or set ${DATA_ENV})")
    return EvalData(
        dataset=dataset,
        examples=read_jsonl(folder / examples_file, limit),
        unrelated=read_jsonl(folder / unrelated_file) if unrelated_file else [],
        hashes={name: file_sha256(folder / name) for name in names},
    )
