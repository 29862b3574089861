"""The direct shard reader returns exactly what zarr returns, for every codec, and fails loudly on corruption."""

import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from cache_crash_writer import DESCRIPTION, IDENTITY

from crepa.cache.atomic import is_local
from crepa.cache.rows import ByteSource, Rows, ShardRows, open_rows
from crepa.cache.store import CODECS, CacheStore


def entry_arrays(index: int) -> dict[str, np.ndarray]:
    """Fixed (3, 5, 7) fp16 and ragged (n, 6) int32 arrays; entry 2 is all zeros, so zarr skips its chunks."""
    rng = np.random.default_rng(index)
    arrays = {"patch": rng.standard_normal((3, 5, 7)).astype(np.float16),
              "tokens": rng.integers(-9, 9, (int(rng.integers(1, 9)), 6)).astype(np.int32)}
    return {name: np.zeros_like(a) for name, a in arrays.items()} if index == 2 else arrays


def write_segment(url: str, codec: str) -> tuple[CacheStore, str]:
    """A store with one segment of 5 entries; returns it and the segment's folder path inside the store."""
    store = CacheStore.open(url, mode="a")
    fset = store.feature_set("teacher", IDENTITY, DESCRIPTION)
    with store.writer(fset, ragged=("tokens",), codec=codec) as writer:
        for index in range(5):
            writer.add(f"k{index}", "g", entry_arrays(index))
    entry = store.entry(fset, "k0")
    return store, f"{fset.path}/g/{entry['segment']}"


def rows_of(url: str, path: str) -> tuple[Rows, zarr.Array]:
    """The row reader the store would use for the array at `path`, and the same array opened by zarr."""
    fs, root = fsspec.core.url_to_fs(url)
    zstore = zarr.storage.LocalStore(root) if is_local(fs) else zarr.storage.FsspecStore.from_url(url, read_only=True)
    array = zarr.open_array(zstore, path=path, mode="r")
    return open_rows(array, ByteSource(fs, root.rstrip("/"))), array


@pytest.fixture(params=["path", "memory"])
def url(request, tmp_path):
    if request.param == "path":
        yield str(tmp_path / "cache")
    else:
        name = f"rows-{uuid.uuid4().hex}"
        yield f"memory://{name}"
        fsspec.filesystem("memory").rm(f"/{name}", recursive=True)


@pytest.mark.parametrize("codec", CODECS)
def test_rows_match_zarr_for_every_codec_and_range(url, codec):
    _, segment = write_segment(url, codec)
    for name in ("patch", "tokens", "tokens.offsets"):
        rows, array = rows_of(url, f"{segment}/{name}")
        assert isinstance(rows, ShardRows)
        total = array.shape[0]
        for start, stop in [(0, total), (0, 1), (1, 3), (total - 1, total), (2, 2)]:
            got = rows.read(start, stop)
            assert got.dtype == array.dtype and got.flags.c_contiguous
            np.testing.assert_array_equal(got, array[start:stop])
        np.testing.assert_array_equal(rows.read(0), array[:])


def test_store_reads_ragged_entries_across_chunks_and_all_zero_entries(tmp_path):
    url = str(tmp_path / "cache")
    store, _ = write_segment(url, "zstd")
    reader = CacheStore.open(url)
    [fset] = reader.feature_sets("teacher")
    for index in range(5):
        got = reader.read(fset, f"k{index}")
        for name, want in entry_arrays(index).items():
            assert got[name].dtype == want.dtype
            np.testing.assert_array_equal(got[name], want)
    assert reader.verify().ok


def test_other_layouts_are_read_through_zarr(tmp_path):
    url = str(tmp_path / "plain")
    array = zarr.create_array(zarr.storage.LocalStore(url), name="a", shape=(4, 3), chunks=(2, 3), dtype="float32")
    array[...] = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows, _ = rows_of(url, "a")
    assert type(rows) is Rows
    np.testing.assert_array_equal(rows.read(1, 3), array[1:3])


@pytest.mark.parametrize("codec", CODECS)
def test_corrupted_chunk_fails_loudly(tmp_path, codec):
    url = str(tmp_path / "cache")
    _, segment = write_segment(url, codec)
    [shard] = [p for p in Path(url, segment, "patch").rglob("*") if p.is_file() and p.name != "zarr.json"]
    data = bytearray(shard.read_bytes())
    data[8:40] = bytes(b ^ 0xFF for b in data[8:40])  # inside the first chunk's payload, whatever the codec
    shard.write_bytes(bytes(data))
    rows, _ = rows_of(url, f"{segment}/patch")
    with pytest.raises((ValueError, RuntimeError)):
        rows.read(0, 1)


def test_corrupted_shard_index_fails_loudly(tmp_path):
    url = str(tmp_path / "cache")
    _, segment = write_segment(url, "zstd")
    [shard] = [p for p in Path(url, segment, "patch").rglob("*") if p.is_file() and p.name != "zarr.json"]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the index of (offset, length) pairs at the end of the shard
    shard.write_bytes(bytes(data))
    rows, _ = rows_of(url, f"{segment}/patch")
    with pytest.raises(ValueError, match="CRC32C checksum mismatch"):
        rows.read(0, 1)
