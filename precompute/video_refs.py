"""References to encoded videos (or images) stored inside bigger files: tar shard members and dataset rows.

Plans and decode tasks carry these instead of the videos' bytes, so a rank's resident memory holds only the
videos being probed or decoded, not its whole share of the dataset. They pickle to a few hundred bytes, and
`read()` runs where the video is opened (a decode worker). Light imports only: decode workers unpickle them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from crepa.errors import UserError


@dataclass(frozen=True)
class ShardMember:
    """One member of an uncompressed tar shard, read by byte range (local path or fsspec URL)."""

    url: str
    name: str
    """Member name, for messages."""
    offset: int
    """Byte offset of the member's data in the shard."""
    size: int

    def read(self) -> bytes:
        import fsspec

        with fsspec.open(self.url, "rb") as shard:
            return self.read_from(shard)

    def read_from(self, shard) -> bytes:
        """The member's bytes from `shard`, an open binary file of the shard."""
        shard.seek(self.offset)
        data = shard.read(self.size)
        if len(data) != self.size:
            raise UserError(f"{self.url}: member {self.name} is truncated ({len(data)} of {self.size} bytes)")
        return data


@dataclass(frozen=True)
class DatasetRow:
    """The encoded video in one row of a Hugging Face dataset split."""

    dataset: str
    """Folder written by `save_to_disk`, or a name for `datasets.load_dataset`."""
    split: str
    column: str
    row: int

    def read(self) -> bytes:
        return video_column(self.dataset, self.split, self.column)[self.row][self.column]["bytes"]


@functools.lru_cache(maxsize=8)
def hf_split(dataset: str, split: str):
    """The split as `datasets` opens it (memory-mapped Arrow), once per process."""
    import datasets  # heavy; only this source kind needs it

    if not Path(dataset).exists():
        return datasets.load_dataset(dataset, split=split)
    loaded = datasets.load_from_disk(dataset)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"hf_split {split!r} is not in {dataset}; use one of {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


@functools.lru_cache(maxsize=8)
def video_column(dataset: str, split: str, column: str):
    """Only `column` of the split, with Video and Image features as {"bytes", "path"} dicts (PyAV and PIL decode,
    not `datasets`)."""
    import datasets

    rows = hf_split(dataset, split).select_columns([column])
    feature = rows.features[column]
    if isinstance(feature, datasets.Video | datasets.Image):
        rows = rows.cast_column(column, type(feature)(decode=False))
    return rows
