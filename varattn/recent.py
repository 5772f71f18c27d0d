"""A bounded map, oldest entry out first: every cache varattn keeps (lengths
made on the device, strided layouts, checked call structures) is one, so
that none grows without bound and frontends/ragged.clear_caches() empties
them all."""
from __future__ import annotations

import threading


class Recent:
    """A bounded map, the entry put longest ago out first; safe across
    threads. A hit is one lookup (no reordering): a hot entry put out by
    `limit` newer ones is made again, once."""

    made: list = []

    def __init__(self, limit: int):
        self.limit, self._items, self._lock = limit, {}, threading.Lock()
        Recent.made.append(self)

    def get(self, key):
        return self._items.get(key)  # one atomic operation on the map: no lock

    def put(self, key, value) -> None:
        with self._lock:
            items = self._items
            items.pop(key, None)
            items[key] = value
            if len(items) > self.limit:
                del items[next(iter(items))]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
