"""Several read modes in one run: the memory is written once and every read mode asks in turn.

A read mode is a name of the model's table of reads (`READS`, the config field `read_mode`); the model reads its
config's `read_mode` at every forward, so one model with one memory serves them all by switching the field between
reads (`ReadModes.reading`). What does not read the memory (no memory, text in the prompt) is asked once and shared
by every mode's records.

Records: a run of one read mode (`--read-mode`, or none) keys its records as it always did; a run of several
(`--read-modes A B ...`) keys each mode's records `MODE/KEY` and gives each the field `read_mode`. The records of
one mode are exactly those a run of that mode alone writes (tested), so every metric, report table and shard merge
works on one mode's records as it does on a single-mode run's; a results file of several modes holds them per mode
in `by_read_mode` (`sub_documents` gives each mode's view).
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

# The fields of a results document that belong to one read mode (the rest is shared by every mode).
MODE_FIELDS = ("metrics", "records", "sequential", "rows")


class ReadModes:
    """The read modes a run serves: `names` (None for a run that leaves the model's read mode alone)."""

    def __init__(self, model, modes: Sequence[str] | None = None):
        self.model = model
        self.names: list[str | None] = list(dict.fromkeys(modes)) if modes else [None]
        self.multi = len(self.names) > 1
        for name in self.names:  # every mode must be servable before anything runs
            with self.reading(name):
                pass

    @contextmanager
    def reading(self, mode: str | None):
        """Read with `mode` inside the block (None: the model's own), the previous mode back after it."""
        if mode is None:
            yield
            return
        config = self.model.config
        previous = config.read_mode
        config.read_mode = mode
        try:
            try:
                config.check_memory_settings()
            except ValueError as err:
                raise ValueError(f"read mode {mode!r} cannot be served by this model: {err}") from None
            yield
        finally:
            config.read_mode = previous

    def key(self, mode: str | None, key: str) -> str:
        """The log key of `mode`'s record of item `key`."""
        return f"{mode}/{key}" if self.multi else key

    def keys(self, mode: str | None, keys: Sequence[str]) -> list[str]:
        return [self.key(mode, key) for key in keys]

    def tag(self, mode: str | None, record: dict) -> dict:
        """`record` with its read mode (in a run of several modes)."""
        return {**record, "read_mode": mode} if self.multi else record

    def pending(self, log, keys: Sequence[str], desc: str, unit: str):
        """`log.pending` over items `keys`: those some mode has no record of yet."""
        lists = [self.keys(mode, keys) for mode in self.names]
        return log.pending(lists[0], desc=desc, unit=unit, more=lists[1:])

    def missing(self, log, key: str) -> list[str | None]:
        """The modes without a record of item `key` in `log`."""
        return [mode for mode in self.names if log.get(self.key(mode, key)) is None]

    def shared(self, log, key: str) -> dict | None:
        """A finished record of item `key` of any mode (its mode-independent parts are every mode's)."""
        for mode in self.names:
            found = log.get(self.key(mode, key))
            if found is not None:
                return found
        return None

    def fields(self, fields_of: Callable[[str | None], dict]) -> dict:
        """The results fields: `fields_of(mode)` itself for one mode; for several, `read_modes` and `by_read_mode`."""
        if not self.multi:
            return fields_of(self.names[0])
        return {"read_modes": self.names, "by_read_mode": {mode: fields_of(mode) for mode in self.names}}


def is_multi(document: dict) -> bool:
    return "by_read_mode" in document


def sub_documents(document: dict) -> Iterator[tuple[str | None, dict]]:
    """(mode, the document as a run of that mode alone would have it) for each read mode of a results document
    ((None, document) for a file of one mode, old files included)."""
    if not is_multi(document):
        yield None, document
        return
    for mode in document["read_modes"]:
        yield mode, {**document, **document["by_read_mode"][mode], "read_mode": mode}


def recompute_modes(document: dict, metrics_of: Callable[[dict], dict]) -> dict:
    """The fields `metrics_of` recomputes, for each read mode of `document` (in place of `metrics_of(document)`)."""
    if not is_multi(document):
        return metrics_of(document)
    by_mode = {}
    for mode, sub in sub_documents(document):
        by_mode[mode] = {**document["by_read_mode"][mode], **metrics_of(sub)}
    return {"by_read_mode": by_mode}
