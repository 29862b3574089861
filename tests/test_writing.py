"""The background segment writer: entries committed as added, writer errors re-raised, nothing half-written kept."""

from __future__ import annotations

import numpy as np
import pytest

from crepa.cache.store import CacheStore
from precompute.writing import BackgroundWriter


def open_set(tmp_path):
    store = CacheStore.open(str(tmp_path / "cache"), "a")
    return store, store.feature_set("latents", {"test": "background writer"}, {})


def entry(i: int) -> dict[str, np.ndarray]:
    return {"x": np.full((2, 3), i, dtype=np.float32)}


def test_every_entry_is_committed(tmp_path):
    store, fset = open_set(tmp_path)
    with store.writer(fset, max_segment_entries=2) as writer, BackgroundWriter({"a": writer}, depth=1) as out:
        for i in range(5):
            out.add("a", f"k{i}", "g", entry(i), {"i": i})
    reader = CacheStore.open(str(tmp_path / "cache"))
    assert reader.keys(fset) == {f"k{i}" for i in range(5)}
    np.testing.assert_array_equal(reader.read(fset, "k3")["x"], entry(3)["x"])
    assert reader.entry(fset, "k4")["i"] == 4
    assert reader.verify().ok


def test_a_writer_error_is_raised_in_the_caller_and_nothing_after_it_is_committed(tmp_path):
    store, fset = open_set(tmp_path)
    with pytest.raises(ValueError, match="same names, dtypes and shapes"):
        with store.writer(fset, max_segment_entries=2) as writer, BackgroundWriter({"a": writer}, depth=1) as out:
            out.add("a", "k0", "g", entry(0))
            out.add("a", "k1", "g", {"x": np.zeros(4, np.float32)})  # another shape in one group: the thread fails
            for i in range(2, 20):
                out.add("a", f"k{i}", "g", entry(i))
    reader = CacheStore.open(str(tmp_path / "cache"))
    assert reader.keys(fset) == set()  # k0 was buffered, never committed
    report = reader.verify()
    assert report.ok and report.orphans == []


def test_leaving_on_an_exception_drops_what_is_not_committed(tmp_path):
    store, fset = open_set(tmp_path)
    with pytest.raises(RuntimeError, match="interrupted"):
        with store.writer(fset, max_segment_entries=2) as writer, BackgroundWriter({"a": writer}) as out:
            for i in range(3):
                out.add("a", f"k{i}", "g", entry(i))
            raise RuntimeError("interrupted")
    keys = CacheStore.open(str(tmp_path / "cache")).keys(fset)
    assert keys in (set(), {"k0", "k1"})  # a whole segment may have been committed first; k2 never is
    assert CacheStore.open(str(tmp_path / "cache")).verify().ok


def test_an_unknown_writer_name_fails_at_once(tmp_path):
    store, fset = open_set(tmp_path)
    with store.writer(fset) as writer, BackgroundWriter({"a": writer}) as out, pytest.raises(KeyError, match="'b'"):
        out.add("b", "k", "g", entry(0))
