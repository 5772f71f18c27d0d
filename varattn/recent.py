"""A bounded map, least recently used out first: every cache varattn keeps
(lengths made on the device, strided layouts, checked call structures,
dispatch choices) is one, so that none grows without bound and
frontends/ragged.clear_caches() empties them all."""
from __future__ import annotations

import collections
import threading


class Recent:
    """A bounded map, least recently used out first; safe across threads."""

    made: list = []

    def __init__(self, limit: int):
        self.limit, self._items, self._lock = limit, collections.OrderedDict(), threading.Lock()
        Recent.made.append(self)

    def get(self, key):
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            if len(self._items) > self.limit:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
