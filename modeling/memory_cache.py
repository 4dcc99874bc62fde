"""Caches of values computed from memory by the model's weights (keys/values, retrieval features): one rule for all.

The rule: an entry is kept under the memory it was computed from (the object itself, held weakly, so an entry leaves
with its block or pool) together with the fingerprint of everything else it was computed from (the weights, adapters,
settings); a look-up with another fingerprint computes afresh. A cache belongs to one model (created in its
`__init__`): memory shared by states, snapshots and other models never carries values computed by other weights.
Copies and pickles of a cache start empty (the values are derived and cheap to compute again).
"""

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable


class DerivedCache:
    """Values computed from memory, each under its source (an object, held weakly, or a hashable key) and the
    fingerprint of the weights that computed it. `get(..., limit=)` bounds the total `size(value)`; the least
    recently used entries leave first."""

    def __init__(self, size: Callable[[object], int] | None = None):
        self.size = size or _one
        self._entries: OrderedDict = OrderedDict()  # key -> (reference or None, fingerprint, value)
        self._lock = threading.RLock()

    def get(self, source, fingerprint, compute: Callable[[], object], limit: int | None = None):
        """The value for `source` computed under `fingerprint` (computed now by `compute()` if not kept)."""
        try:
            key = id(source)
            ref = weakref.ref(source, functools.partial(self._forget, key))
        except TypeError:  # strings, tuples: a plain key
            ref, key = None, ("key", source)
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found[1] == fingerprint and (ref is None or found[0]() is source):
                self._entries.move_to_end(key)
                return found[2]
        value = compute()
        with self._lock:
            self._entries[key] = (ref, fingerprint, value)
            self._entries.move_to_end(key)
            if limit is not None:
                while self._entries and sum(self.size(entry[2]) for entry in list(self._entries.values())) > limit:
                    self._entries.popitem(last=False)
        return value

    def _forget(self, key, ref) -> None:
        """A source was freed: its entry leaves with it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] is ref:
                del self._entries[key]

    def clear(self) -> None:
        """Forget every value (the next look-ups compute afresh)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo) -> "DerivedCache":
        return DerivedCache(self.size)

    def __reduce__(self):
        return (DerivedCache, (self.size,))


def _one(value) -> int:
    return 1
