"""Rows of the store's arrays, read straight from their shards into the arrays handed back.

The store writes every array sharded, one entry (or, for ragged arrays, one run of tokens) per chunk along
axis 0 and full extent on the other axes, compressed with zstd or blosc, or not at all, and every chunk
carrying a checksum. A segment never changes once committed, so its shard index can be read once per array;
a row then costs one ranged read and one decompression into the output. Reading the same row through
`zarr.Array.__getitem__` costs an event-loop round trip, a fresh shard-index read and two extra copies:
about 2 ms per call and 2-3x the time for a 90 MB teacher entry.

Arrays of any other layout or codec are read through zarr, so this is a shortcut and never a second format.
Corruption still fails loudly: the zstd frame checksum, the chunk's CRC32C and the shard index's CRC32C are
checked on every read.
"""

from __future__ import annotations

import os
import sys
import threading

import fsspec
import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc, Zstd
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

from crepa.cache.atomic import is_local
from crepa.errors import UserError

_EMPTY = 2**64 - 1  # shard index value of a chunk that was never written (all fill value)
_CRC = 4  # bytes of a CRC32C checksum


class ByteSource:
    """Ranged reads of the files under a store's root; a negative start counts from the end of the file."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self._fs, self._root, self._local = fs, root, is_local(fs)
        self._scratch = threading.local()  # one reusable buffer per thread: fresh pages cost more than the read

    def read(self, key: str, start: int, size: int) -> np.ndarray:
        """`size` bytes (uint8) of file `key` from `start`, in a buffer this thread's next read overwrites."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.size < size:
            buffer = self._scratch.buffer = np.empty(size, np.uint8)
        self.read_into(key, start, buffer[:size])
        return buffer[:size]

    def read_into(self, key: str, start: int, out: np.ndarray) -> None:
        """Fill `out` (contiguous uint8) with the bytes of file `key` from `start`."""
        path = f"{self._root}/{key}"
        if not self._local:
            data = self._fs.cat_file(path, start=start, end=None if start < 0 else start + out.size)
            self._check_size(len(data), out.size, key)
            out[:] = np.frombuffer(data, np.uint8)
            return
        filled = 0
        with open(path, "rb", buffering=0) as f:
            f.seek(start, os.SEEK_END if start < 0 else os.SEEK_SET)
            while filled < out.size:  # one read returns at most 2 GiB
                got = f.readinto(out[filled:])
                if not got:
                    break
                filled += got
        self._check_size(filled, out.size, key)

    @staticmethod
    def _check_size(got: int, size: int, key: str) -> None:
        if got != size:
            raise OSError(f"{key}: expected {size} bytes, the file holds {got}; the shard is truncated")


def _check_crc(payload: np.ndarray, stored: np.ndarray, what: str) -> None:
    """Raise unless `stored` (4 bytes, little-endian) is the CRC32C of `payload`."""
    if google_crc32c.value(payload) != int.from_bytes(stored.tobytes(), "little"):
        raise UserError(f"{what}: CRC32C checksum mismatch (corrupted data)")


class Rows:
    """Rows [start, stop) along axis 0 of one array of the store."""

    def __init__(self, array: zarr.Array):
        self.array = array

    def read(self, start: int, stop: int | None = None) -> np.ndarray:
        """Rows start..stop (default: to the end) as a new array of shape (stop - start, *tail)."""
        return np.asarray(self.array[start:stop])


class ShardRows(Rows):
    """Rows of an array in the store's sharded layout, read without zarr's per-call machinery."""

    def __init__(self, array: zarr.Array, source: ByteSource, decompress: Zstd | Blosc | None, crc: bool):
        super().__init__(array)
        self.source, self.decompress, self.crc = source, decompress, crc
        self.dtype = array.metadata.dtype.to_native_dtype()
        self.chunk_rows = array.chunks[0]
        self.chunks_per_shard = array.shards[0] // self.chunk_rows
        self.row_shape = tuple(array.shape[1:])
        self._indexes: dict[int, np.ndarray] = {}  # shard number -> (chunks_per_shard, 2) offsets and lengths

    def read(self, start: int, stop: int | None = None) -> np.ndarray:
        stop = self.array.shape[0] if stop is None else stop
        if not 0 <= start <= stop <= self.array.shape[0]:
            raise IndexError(f"rows {start}:{stop} are out of range for {self.array.path} of {self.array.shape[0]}")
        out = np.empty((stop - start, *self.row_shape), self.dtype)
        for chunk in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            first = chunk * self.chunk_rows
            lo, hi = max(start, first), min(stop, first + self.chunk_rows)
            if (lo, hi) == (first, first + self.chunk_rows):  # the whole chunk is wanted: decode in place
                self._chunk(chunk, out[lo - start: hi - start])
            else:  # (chunk_rows, *tail), a stored chunk is always full size
                part = np.empty((self.chunk_rows, *self.row_shape), self.dtype)
                self._chunk(chunk, part)
                out[lo - start: hi - start] = part[lo - first: hi - first]
        return out

    def _chunk(self, chunk: int, dest: np.ndarray) -> None:
        """Decode chunk `chunk` (counted along axis 0) into `dest`, a C-contiguous array of its full size."""
        shard, inner = divmod(chunk, self.chunks_per_shard)
        offset, length = self._index(shard)[inner]
        if offset == _EMPTY:  # never written: every value is the fill value
            dest[...] = self.array.fill_value
            return
        key, offset, length = self._shard_key(shard), int(offset), int(length)
        flat = dest.reshape(-1).view(np.uint8)  # (nbytes,)
        where = f"chunk {chunk} of {self.array.path}"
        if self.decompress is None:  # stored as is: read straight into the output, then check the trailer
            if length != flat.size + _CRC * self.crc:
                raise UserError(f"{where} holds {length} bytes, expected {flat.size + _CRC * self.crc}")
            self.source.read_into(key, offset, flat)
            if self.crc:
                _check_crc(flat, self.source.read(key, offset + flat.size, _CRC), where)
            return
        data = self.source.read(key, offset, length)
        if self.crc:
            _check_crc(data[:-_CRC], data[-_CRC:], where)
            data = data[:-_CRC]
        self.decompress.decode(data, out=flat)

    def _index(self, shard: int) -> np.ndarray:
        index = self._indexes.get(shard)
        if index is None:
            size = self.chunks_per_shard * 16 + _CRC  # (offset, length) uint64 per chunk, then the CRC32C
            try:
                data = self.source.read(self._shard_key(shard), -size, size)
                _check_crc(data[:-_CRC], data[-_CRC:], f"shard index of {self.array.path}")
                index = data[:-_CRC].view("<u8").reshape(self.chunks_per_shard, 2).copy()
            except FileNotFoundError:  # zarr writes no shard whose chunks all hold the fill value
                index = np.full((self.chunks_per_shard, 2), _EMPTY, np.uint64)
            self._indexes[shard] = index
        return index

    def _shard_key(self, shard: int) -> str:
        coords = [str(shard)] + ["0"] * (self.array.ndim - 1)  # shards span every axis but the first
        return f"{self.array.path}/c/" + "/".join(coords)


def _shortcut_codecs(array: zarr.Array) -> tuple[Zstd | Blosc | None, bool] | None:
    """(decompressor, trailing CRC32C) when the array has the store's layout and codecs, else None."""
    meta = array.metadata
    if meta.zarr_format != 3 or len(meta.codecs) != 1 or not isinstance(meta.codecs[0], ShardingCodec):
        return None
    if not isinstance(meta.chunk_grid, RegularChunkGrid) or meta.storage_transformers:
        return None
    encoding = meta.chunk_key_encoding
    if not isinstance(encoding, DefaultChunkKeyEncoding) or encoding.separator != "/":
        return None
    sharding = meta.codecs[0]
    tail = tuple(array.shape[1:])
    if tuple(array.chunks[1:]) != tail or tuple(array.shards[1:]) != tail or array.shards[0] % array.chunks[0]:
        return None  # a chunk must span whole rows
    index_codecs = [type(c) for c in sharding.index_codecs]
    if sharding.index_location != ShardingCodecIndexLocation.end or index_codecs != [BytesCodec, Crc32cCodec]:
        return None
    serializer, *rest = sharding.codecs
    native = "little" if sys.byteorder == "little" else "big"
    if not isinstance(serializer, BytesCodec) or (array.dtype.itemsize > 1 and serializer.endian.value != native):
        return None
    crc = bool(rest) and isinstance(rest[-1], Crc32cCodec)
    rest = rest[:-1] if crc else rest
    if not rest:
        return None, crc
    if len(rest) > 1:
        return None
    if isinstance(rest[0], ZstdCodec):
        return Zstd(level=rest[0].level, checksum=rest[0].checksum), crc
    if isinstance(rest[0], BloscCodec):
        return Blosc(), crc  # blosc's header carries its own settings
    return None


def open_rows(array: zarr.Array, source: ByteSource) -> Rows:
    """The fastest reader of `array`'s rows: ShardRows for the store's layout, zarr for anything else."""
    codecs = _shortcut_codecs(array)
    return Rows(array) if codecs is None else ShardRows(array, source, *codecs)
