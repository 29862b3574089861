"""WebDataset export: shards readable by plain tar and webdataset, complete or absent, keyed by clip."""

import io
import json
import os
import subprocess
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
import webdataset

from crepa.cache.wds import export_webdataset, iter_webdataset, read_index, write_index_for
from crepa.errors import UserError


def sample(i: int, teacher: bool = True) -> dict:
    rng = np.random.default_rng(i)
    out = {
        "__key__": f"clip{i:03d}",
        "latents.npy": rng.standard_normal((4, 2, 8, 8)).astype(np.float16),
        "text.npy": rng.standard_normal((7, 16)).astype(np.float32),
        "json": {"caption": f"clip number {i}", "group": "f5_h64_w64", "num_repeats": 1 + i % 3},
    }
    if teacher:
        out["teacher.npy"] = rng.standard_normal((2, 4, 4, 8)).astype(np.float16)
    return out


def test_round_trip_through_webdataset(tmp_path):
    samples = [sample(i, teacher=i != 3) for i in range(7)]
    urls = export_webdataset(iter(samples), str(tmp_path), maxcount=3)
    assert urls == [str(tmp_path / f"cache-{i:06d}.tar") for i in range(3)]
    assert sorted(os.listdir(tmp_path)) == [f"cache-{i:06d}.tar" for i in range(3)] + ["shards.json"]  # no temp files

    got = list(iter_webdataset(urls))
    assert [s["__key__"] for s in got] == [s["__key__"] for s in samples]
    for back, want in zip(got, samples, strict=True):
        assert back["json"] == want["json"]
        assert ("teacher.npy" in back) == ("teacher.npy" in want)
        for field in ("latents.npy", "text.npy", "teacher.npy"):
            if field in want:
                assert back[field].dtype == want[field].dtype
                np.testing.assert_array_equal(back[field], want[field])


def test_plain_tar_sees_one_member_per_field(tmp_path):
    [url] = export_webdataset([sample(0), sample(1, teacher=False)], str(tmp_path))
    listing = subprocess.run(["tar", "-tf", url], capture_output=True, text=True, check=True).stdout.split()
    assert listing == [
        "clip000.json",
        "clip000.latents.npy",
        "clip000.teacher.npy",
        "clip000.text.npy",
        "clip001.json",
        "clip001.latents.npy",
        "clip001.text.npy",
    ]


def test_maxsize_starts_new_shards(tmp_path):
    urls = export_webdataset([sample(i) for i in range(3)], str(tmp_path), maxsize=100)
    assert len(urls) == 3
    assert [s["__key__"] for s in iter_webdataset(urls)] == ["clip000", "clip001", "clip002"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"__key__": None}, "without a __key__"),
        ({"__key__": "clip.1"}, "contains '.' or '/'"),
        ({"__key__": "a/clip1"}, "contains '.' or '/'"),
        ({"__key__": "clip000"}, "appears twice"),
        ({"json": None}, "lacks fields \\['json'\\]"),
    ],
)
def test_refuses_bad_samples_and_leaves_no_partial_shard(tmp_path, change, message):
    bad = {k: v for k, v in {**sample(1), **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        export_webdataset([sample(0), bad], str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_export_to_fsspec_url():
    url = f"memory://wds-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    try:
        urls = export_webdataset([sample(i) for i in range(3)], url, maxcount=2)
        assert urls == [f"{url}/cache-000000.tar", f"{url}/cache-000001.tar"]
        assert sorted(fs.ls(url, detail=False)) == [u.removeprefix("memory:/") for u in urls] + [
            f"{url.removeprefix('memory:/')}/shards.json"]
        assert [s["__key__"] for s in iter_webdataset(read_index(url).urls)] == ["clip000", "clip001", "clip002"]
        with tarfile.open(fileobj=io.BytesIO(fs.cat(urls[1]))) as tar:
            assert tar.getnames() == ["clip002.json", "clip002.latents.npy", "clip002.teacher.npy", "clip002.text.npy"]
    finally:
        fs.rm(url.removeprefix("memory:/"), recursive=True)


def test_reader_raises_on_a_bad_member(tmp_path):
    path = tmp_path / "cache-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("clip0.json", b'{"a": 1}'), ("clip0.latents.npy", b"not an npy file")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="field 'latents.npy' of sample 'clip0' cannot be decoded"):
        list(iter_webdataset([str(path)]))


def test_index_is_a_wids_shard_index_with_the_counts_tar_sees(tmp_path):
    export_webdataset([sample(i) for i in range(5)], str(tmp_path), maxcount=2, meta={"family": "wan"})
    index = json.loads((tmp_path / "shards.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
    assert index["crepa"] == {"family": "wan"}
    for entry in index["shardlist"]:
        with tarfile.open(tmp_path / entry["url"]) as tar:  # urls are relative to the index, as wids resolves them
            metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
        assert entry["nsamples"] == len(metas)
        assert entry["repeated"] == sum(m["num_repeats"] for m in metas)
        assert entry["filesize"] == os.path.getsize(tmp_path / entry["url"])
    assert [e["nsamples"] for e in index["shardlist"]] == [2, 2, 1]


def test_reexport_refuses_a_full_folder_and_overwrite_leaves_no_stale_shard(tmp_path):
    export_webdataset([sample(i) for i in range(5)], str(tmp_path), maxcount=1)
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        export_webdataset([sample(9)], str(tmp_path))
    export_webdataset([sample(7), sample(8)], str(tmp_path), maxcount=1, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["cache-000000.tar", "cache-000001.tar", "shards.json"]
    shards = sorted(str(p) for p in tmp_path.glob("*.tar"))
    keys = [s["__key__"] for s in webdataset.WebDataset(shards, shardshuffle=False, nodesplitter=None)]
    assert keys == ["clip007", "clip008"]


def test_cache_argument_forms_name_the_same_shards(tmp_path):
    export_webdataset([sample(i) for i in range(5)], str(tmp_path), maxcount=2)
    shards = [str(tmp_path / f"cache-{i:06d}.tar") for i in range(3)]
    assert read_index(str(tmp_path)).urls == shards
    assert read_index(str(tmp_path / "shards.json")).urls == shards
    assert read_index(str(tmp_path / "cache-{000000..000001}.tar")).urls == shards[:2]
    from_url = read_index(f"file://{tmp_path}")
    assert from_url.urls == [f"file://{s}" for s in shards] and from_url.nsamples == [2, 2, 1]
    assert from_url.repeated == [1 + 2, 3 + 1, 2]
    assert [s["__key__"] for s in iter_webdataset(from_url.urls)] == [f"clip{i:03d}" for i in range(5)]


def test_shards_without_an_index_say_how_to_write_one(tmp_path):
    export_webdataset([sample(i) for i in range(3)], str(tmp_path), maxcount=2)
    os.remove(tmp_path / "shards.json")
    with pytest.raises(FileNotFoundError, match=f"no shard index {tmp_path}/shards.json.*crepa cache index {tmp_path}"):
        read_index(str(tmp_path))
    index = write_index_for(str(tmp_path))
    assert index.nsamples == [2, 1] and index.repeated == [1 + 2, 3]


@pytest.mark.parametrize("text", ['{"__kind__": "wids-shard-index-v1", "shardlist": [',
                                  '{"__kind__": "wids-shard-index-v1", "shardlist": [{"url": "cache-000000.tar"}]}',
                                  '{"__kind__": "wids-shard-index-v1", "shardlist": [{"nsamples": 1}]}',
                                  '{"__kind__": "wids-shard-index-v1", "shardlist": ["cache-000000.tar"]}'],
                         ids=["bad-json", "no-nsamples", "no-url", "entry-not-an-object"])
def test_a_malformed_index_says_how_to_rewrite_it(tmp_path, text):
    export_webdataset([sample(0)], str(tmp_path))
    (tmp_path / "shards.json").write_text(text)
    with pytest.raises(UserError, match=f"{tmp_path}/shards.json.*crepa cache index {tmp_path}"):
        read_index(str(tmp_path))
