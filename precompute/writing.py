"""Segment writes on a background thread, so compression, checksums and disk writes overlap the model forwards."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping

import numpy as np

from crepa.cache.store import SegmentWriter

_STOP = object()


class BackgroundWriter:
    """Adds entries to named segment writers on one thread; the caller only waits when `depth` entries queue up.

    Crash safety is the segment writers': an entry is visible once the segment holding it is committed by its
    manifest, never before. An error inside a writer is re-raised in the caller's thread by the next `add` or by
    `close`, and every entry after it is dropped. Use as the innermost context manager beside the writers' own
    blocks: leaving on an exception stops the thread and drops what is queued, then the writers drop what they
    buffered, so nothing half-written is committed. Leaving normally waits for every queued entry; the writers'
    blocks then flush the rest.
    """

    def __init__(self, writers: Mapping[str, SegmentWriter], depth: int = 4,
                 prepare: Mapping[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] | None = None) -> None:
        """`prepare`: per writer, a function applied to an entry's arrays on the thread before they are added
        (host-side work such as quantisation that would otherwise hold up the model loop)."""
        self._writers = dict(writers)
        self._prepare = dict(prepare or {})
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._reported = False
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crepa-segment-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon.set()
        self.close()

    def add(self, writer: str, key: str, group: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
        """Queue `SegmentWriter.add(key, group, arrays, meta)` for writer `writer`; the arrays must not change after."""
        self._raise_error()
        if writer not in self._writers:
            raise KeyError(f"no segment writer named {writer!r}; known: {sorted(self._writers)}")
        self._queue.put((writer, key, group, arrays, meta))

    def close(self) -> None:
        """Wait until every queued entry is added (or dropped after an error), then re-raise that error."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True  # raised once: the close() that follows in __exit__ does not raise it again
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is not None or self._abandon.is_set():
                continue  # drain, so that a caller blocked on a full queue goes on and sees the error
            name, key, group, arrays, meta = item
            try:
                if name in self._prepare:
                    arrays = self._prepare[name](arrays)
                self._writers[name].add(key, group, arrays, meta)
            except BaseException as error:  # re-raised in the caller's thread
                self._error = error
