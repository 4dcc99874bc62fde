"""Resumable, splittable runs: every finished record is appended to a log as soon as it exists.

`OUTPUT.records.jsonl` holds one JSON object per line: first a header (task, configuration, data hashes, model),
then one line per finished record (`{"key", "index", "record"}`), each flushed and fsynced before the run moves on.
Every line carries a checksum (`sha256`: the first 16 hex digits of the SHA-256 of the line's canonical JSON without
it). A run that is killed loses at most the record in progress (a half-written last line is cut off on resume);
a damaged record line anywhere else (zeroed or cut bytes, invalid UTF-8, valid JSON that is no record, a `null`
record, an edited value that no longer matches its checksum) is named by file and line in a warning and skipped: its
item has no record and is computed again (the line stays in the file for inspection; the last valid line of an item
is the one used, also when an item is recorded again, e.g. with more results). A damaged header is refused. A lock file (`OUTPUT.records.jsonl.lock`, `filelock`) is held
while a run writes its log, so a second run or resume of the same log is refused instead of computing items twice.
`--resume` reads the log, refuses it when the run's configuration differs (saying what differs) and continues with
the records still missing. `--shard i/n` runs the items i, i + n, i + 2n, ... of the task (round robin, so shards
get similar mixes); `python -m memoryllm_hf.evaluation.report --merge OUT SHARD.json ...` interleaves the shards'
records back into example order and recomputes the metrics (`merge_shards`).

A run that spans several sittings (stopped, resumed in another session) is timed as a whole: every record line also
carries `spent`, the run's wall and CPU seconds so far (the last line's `spent` of earlier sittings plus this
sitting's), so `RecordLog.spent()` gives the run's total cost and its number of sittings; what an earlier sitting
spent after its last record (the record it was computing when stopped) is not counted.
"""

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

LOG_SUFFIX = ".records.jsonl"
CHECKSUM = "sha256"
# Configuration entries that may change between sittings of one run (they do not change any record).
VOLATILE = ("resume", "threads", "output")
# ... and entries kept in the header but not compared: the data folder may move (another machine, another checkout)
# as long as its files are the same, which the header's `data.file_sha256` checks file by file.
RELOCATABLE = ("data",)


def comparable_header(header: dict) -> dict:
    """A run header as two sittings (or two shards) of one run must agree on it: without `RELOCATABLE` entries."""
    config = {key: value for key, value in header.get("config", {}).items() if key not in RELOCATABLE}
    return {**header, "config": config}


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


def checksum(entry: dict) -> str:
    """The checksum of a log line's entry (everything but the checksum itself)."""
    fields = {key: value for key, value in entry.items() if key != CHECKSUM}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=float, allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


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


def read_entry(line: bytes) -> tuple[dict | None, str | None]:
    """(entry, None) for a sound line of a record log, (None, why) for a damaged one."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 at byte {err.start}"
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not JSON ({err.msg}; a zeroed or cut line?)"
    if not isinstance(entry, dict) or CHECKSUM not in entry:
        return None, "no checksum (not a line this log writes)"
    if entry[CHECKSUM] != checksum(entry):
        return None, "checksum mismatch (the line was changed after it was written)"
    return entry, None


def log_spent(path: str | os.PathLike) -> dict | None:
    """The cost a record log says its run has spent so far (the last sound record line's `spent`: wall and CPU
    seconds, sittings) and its record count, read without taking the log's lock (a running run keeps writing it);
    None when there is no such log."""
    path = Path(path)
    if not path.exists():
        return None
    spent, records = None, 0
    for line in path.read_bytes().split(b"\n")[1:]:
        entry, _ = read_entry(line) if line else (None, None)
        if entry is not None and "record" in entry:
            records += 1
            spent = entry.get("spent", spent)
    return {"records": records, **(spent or {"wall_s": None, "cpu_s": None, "sittings": None})}


class LogBusy(RuntimeError):
    """The record log is held by another run (its lock is taken): nothing was read or written."""


class RecordLog:
    """Finished records of one run (or shard), on disk at `path` (None: in memory only, for library calls). The log
    is locked while this object is open (`close()`, or use it as a context manager)."""

    def __init__(
        self, path: str | os.PathLike | None = None, header: dict | None = None, resume: bool = False, shard=(0, 1)
    ):
        self.path = Path(path) if path is not None else None
        self.shard = tuple(shard)
        self.header = _json(header or {})
        self._records: dict[str, tuple[int, dict]] = {}
        self.damaged: list[str] = []  # "FILE:LINE: why" of each record line skipped on reading
        # cost of the earlier sittings (the last record line's `spent`) and where this sitting's clocks started
        self.earlier = {"wall_s": 0.0, "cpu_s": 0.0, "sittings": 0}
        self.started = (time.perf_counter(), time.process_time())
        self._lock = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(f"{self.path}.lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise LogBusy(
                f"{self.path} is being written by another run (its lock {self.path}.lock is held): wait for that run "
                "to end or stop it before resuming; two runs on one log would compute the same items twice"
            ) from None
        try:
            if self.path.exists() and self.path.stat().st_size:
                if not resume:
                    raise FileExistsError(
                        f"{self.path} holds records of an earlier run; pass --resume to continue it, "
                        "or delete it (or choose another --output) to start over"
                    )
                self._read()
            else:
                self._append({"header": self.header})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the log's lock (records already added stay on disk)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RecordLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> None:
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # a line cut by a kill has no newline yet: drop it
        lines = complete.split(b"\n")[:-1]
        header, why = read_entry(lines[0]) if lines else (None, "empty")
        if header is None or not isinstance(header.get("header"), dict):
            raise ValueError(
                f"{self.path}:1: not the header of a record log ({why or 'no header'}); "
                "delete the log (or choose another --output) to start over"
            )
        differences = _differences(comparable_header(header["header"]), comparable_header(self.header))
        if differences:
            raise ValueError(
                f"cannot resume {self.path}: the run's configuration differs from the one it was started with ("
                + "; ".join(differences)
                + "). Rerun with the recorded options, or choose another --output to start a new run"
            )
        for number, line in enumerate(lines[1:], start=2):
            entry, why = read_entry(line)
            if entry is not None and not (
                isinstance(entry.get("key"), str)
                and isinstance(entry.get("index"), int)
                and isinstance(entry.get("record"), dict)
            ):
                entry, why = None, "not a record (needs a string key, an integer index and a record object)"
            if entry is None:
                self.damaged.append(f"{self.path}:{number}: {why}")
                warnings.warn(f"{self.path}:{number}: {why}; skipped, its item will be computed again", stacklevel=3)
            else:  # (an item recorded again, e.g. with conditions added since: its last line is the one used)
                self._records[entry["key"]] = (entry["index"], entry["record"])
                if isinstance(entry.get("spent"), dict):
                    self.earlier = {key: entry["spent"].get(key, 0) for key in self.earlier}
        if len(complete) != len(raw):
            warnings.warn(
                f"{self.path}:{len(lines) + 1}: cut off by a stopped run (no line end); removed", stacklevel=3
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))

    def _append(self, entry: dict) -> None:
        if self.path is None:
            return
        entry = {**entry, CHECKSUM: checksum(entry)}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=float) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def mine(self, count: int) -> list[int]:
        """Indices of `count` items that belong to this shard."""
        index, shards = self.shard
        return list(range(index, count, shards))

    def todo(self, keys: Sequence[str]) -> list[int]:
        """Indices (into `keys`) of this shard's items without a record yet."""
        if len(set(keys)) != len(keys):
            raise ValueError("item keys must be unique (duplicate example ids in the data?)")
        return [i for i in self.mine(len(keys)) if keys[i] not in self._records]

    def pending(
        self, keys: Sequence[str], desc: str, unit: str, more: Sequence[Sequence[str]] = ()
    ) -> Iterator[int]:
        """Indices (into `keys`) of this shard's items without a record yet, with a progress bar over the shard.
        `more`: further key lists of the same items (one per read mode): an item is pending until all its keys have
        a record."""
        if len(set(keys)) != len(keys):
            raise ValueError(f"{desc}: item keys must be unique (duplicate example ids in the data?)")
        lists = [keys, *more]
        mine = self.mine(len(keys))
        todo = [i for i in mine if any(found[i] not in self._records for found in lists)]
        done = len(mine) - len(todo)
        bar = tqdm(todo, desc=desc, unit=unit, total=len(mine), initial=done)
        yield from bar

    def spent(self) -> dict:
        """The run's cost so far over all its sittings: wall and CPU seconds (this process's CPU time: all its
        threads) and the number of sittings (this one included)."""
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        return {"wall_s": round(self.earlier["wall_s"] + wall, 3), "cpu_s": round(self.earlier["cpu_s"] + cpu, 3),
                "sittings": self.earlier["sittings"] + 1}

    def add(self, key: str, index: int, record: dict) -> None:
        """Keep a finished record (on disk first), with the run's cost so far."""
        record = _json(record)
        self._append({"key": key, "index": index, "record": record, "spent": self.spent()})
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
        differences = _differences(comparable_header(identity(documents[0])), comparable_header(identity(doc)))
        if differences:
            raise ValueError("the shards come from different runs: " + "; ".join(differences))
    merged = dict(documents[0])
    merged["config"] = {**merged["config"], "shard": None}
    merged["records"] = interleave([doc["records"] for doc in documents])
    merged["shards"] = [{"shard": doc["config"]["shard"], "wall_time_s": doc["wall_time_s"]} for doc in documents]
    merged["wall_time_s"] = round(sum(doc["wall_time_s"] for doc in documents), 3)
    merged.update(recompute({**merged, "shard_documents": documents}))
    return merged
