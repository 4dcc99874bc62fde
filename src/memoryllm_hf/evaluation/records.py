"""Resumable, splittable runs: every finished record is appended to a log as soon as it exists.

`OUTPUT.records.jsonl` holds one JSON object per line: first a header (task, configuration, data hashes, model),
then one line per finished record (`{"key", "index", "record"}`), each flushed and fsynced before the run moves on.
A run that is killed loses at most the record in progress (a half-written last line is cut off on resume);
`--resume` reads the log, refuses it when the run's configuration differs (saying what differs) and continues with
the records still missing. `--shard i/n` runs the items i, i + n, i + 2n, ... of the task (round robin, so shards
get similar mixes); `python -m memoryllm_hf.evaluation.report --merge OUT SHARD.json ...` interleaves the shards'
records back into example order and recomputes the metrics (`merge_shards`).
"""

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

LOG_SUFFIX = ".records.jsonl"
# Configuration entries that may change between sittings of one run (they do not change any record).
VOLATILE = ("resume", "threads", "output")


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes INDEX/COUNT, e.g. 0/2 (the first of two shards); got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= INDEX < COUNT (shards are numbered from 0)")
    return index, count


def log_path(output: str | os.PathLike) -> Path:
    """The record log beside a results file."""
    output = Path(output)
    return output.with_name(output.stem + LOG_SUFFIX)


def _json(value):
    """`value` as it reads back from JSON (tuples become lists, floats stay floats)."""
    return json.loads(json.dumps(value, default=float))


def _differences(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} in the log, {new!r} now"]


def run_header(task: str, config: dict, data: dict, model: dict) -> dict:
    """What identifies a run: every record of a log was made under this header."""
    config = {key: value for key, value in config.items() if key not in VOLATILE}
    return _json({"task": task, "config": config, "data": data, "model": model})


class RecordLog:
    """Finished records of one run (or shard), on disk at `path` (None: in memory only, for library calls)."""

    def __init__(
        self, path: str | os.PathLike | None = None, header: dict | None = None, resume: bool = False, shard=(0, 1)
    ):
        self.path = Path(path) if path is not None else None
        self.shard = tuple(shard)
        self.header = _json(header or {})
        self._records: dict[str, tuple[int, dict]] = {}
        if self.path is None:
            return
        if self.path.exists() and self.path.stat().st_size:
            if not resume:
                raise FileExistsError(
                    f"{self.path} holds records of an earlier run; pass --resume to continue it, "
                    "or delete it (or choose another --output) to start over"
                )
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"header": self.header})

    def _read(self) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # a line cut by a kill has no newline yet: drop it
        lines = complete.decode("utf-8").splitlines()
        if not lines or "header" not in json.loads(lines[0]):
            raise ValueError(f"{self.path} is not a record log (no header line); delete it to start over")
        recorded = json.loads(lines[0])["header"]
        differences = _differences(recorded, self.header)
        if differences:
            raise ValueError(
                f"cannot resume {self.path}: the run's configuration differs from the one it was started with ("
                + "; ".join(differences)
                + "). Rerun with the recorded options, or choose another --output to start a new run"
            )
        for line in lines[1:]:
            entry = json.loads(line)
            self._records[entry["key"]] = (entry["index"], entry["record"])
        if len(complete) != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))

    def _append(self, entry: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def mine(self, count: int) -> list[int]:
        """Indices of `count` items that belong to this shard."""
        index, shards = self.shard
        return list(range(index, count, shards))

    def pending(self, keys: Sequence[str], desc: str, unit: str) -> Iterator[int]:
        """Indices (into `keys`) of this shard's items without a record yet, with a progress bar over the shard."""
        if len(set(keys)) != len(keys):
            raise ValueError(f"{desc}: item keys must be unique (duplicate example ids in the data?)")
        mine = self.mine(len(keys))
        done = sum(keys[i] in self._records for i in mine)
        todo = [i for i in mine if keys[i] not in self._records]
        bar = tqdm(todo, desc=desc, unit=unit, total=len(mine), initial=done)
        yield from bar

    def add(self, key: str, index: int, record: dict) -> None:
        """Keep a finished record (on disk first)."""
        record = _json(record)
        self._append({"key": key, "index": index, "record": record})
        self._records[key] = (index, record)

    def get(self, key: str) -> dict | None:
        """The finished record of `key`, or None."""
        found = self._records.get(key)
        return found[1] if found is not None else None

    def records(self, keys: Iterable[str]) -> list[dict]:
        """This shard's records of `keys`, in their order (every one must be finished)."""
        keys = list(keys)
        missing = [keys[i] for i in self.mine(len(keys)) if keys[i] not in self._records]
        if missing:
            raise RuntimeError(f"records missing for {missing[:3]}")
        return [self._records[keys[i]][1] for i in self.mine(len(keys))]


def interleave(parts: Sequence[Sequence[dict]]) -> list[dict]:
    """Records of shards 0..n-1 (round robin) back in item order."""
    total = sum(len(part) for part in parts)
    return [parts[i % len(parts)][i // len(parts)] for i in range(total)]


def merge_shards(documents: Sequence[dict], recompute: Callable[[dict], dict]) -> dict:
    """One results document from the documents of all shards of a run: records in item order, metrics recomputed
    by `recompute(document) -> fields`, wall time summed over the shards (and each shard's kept)."""
    if not documents:
        raise ValueError("no shard results to merge")
    shards = [tuple(doc["config"].get("shard") or (0, 1)) for doc in documents]
    count = shards[0][1]
    if sorted(shards) != [(i, count) for i in range(count)]:
        raise ValueError(f"need every shard 0..{count - 1} of {count} exactly once, got {sorted(shards)}")
    documents = [doc for _, doc in sorted(zip(shards, documents, strict=True), key=lambda pair: pair[0])]

    def identity(doc: dict) -> dict:
        config = {k: v for k, v in doc["config"].items() if k not in (*VOLATILE, "shard")}
        return run_header(doc["task"], config, doc["data"], {**doc["model"]})

    for doc in documents[1:]:
        differences = _differences(identity(documents[0]), identity(doc))
        if differences:
            raise ValueError("the shards come from different runs: " + "; ".join(differences))
    merged = dict(documents[0])
    merged["config"] = {**merged["config"], "shard": None}
    merged["records"] = interleave([doc["records"] for doc in documents])
    merged["shards"] = [{"shard": doc["config"]["shard"], "wall_time_s": doc["wall_time_s"]} for doc in documents]
    merged["wall_time_s"] = round(sum(doc["wall_time_s"] for doc in documents), 3)
    merged.update(recompute({**merged, "shard_documents": documents}))
    return merged
