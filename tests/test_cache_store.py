"""Cache store round trips on real stores: local path, file:// and memory:// URLs, several processes, a kill -9."""

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from cache_crash_writer import DESCRIPTION, IDENTITY, arrays_for, group_of, write

from crepa.cache.keys import bytes_identity, clip_key, file_identity, fingerprint, text_key
from crepa.cache.store import CODECS, CacheStore, VerifyReport

HERE = Path(__file__).parent


@pytest.fixture(params=["path", "file", "memory"])
def url(request, tmp_path):
    if request.param == "memory":
        url = f"memory://cache-{uuid.uuid4().hex}"
        yield url
        fsspec.filesystem("memory").rm(url.removeprefix("memory:/"), recursive=True)
    else:
        yield str(tmp_path / "cache") if request.param == "path" else f"file://{tmp_path}/cache"


def latents_set(store):
    return store.feature_set("latents", IDENTITY, DESCRIPTION)


def test_keys_are_stable_content_hashes(tmp_path):
    assert fingerprint({"b": 1, "a": [1, 2]}) == fingerprint({"a": [1, 2], "b": 1})
    assert len(fingerprint("x")) == 16 and len(fingerprint("x", length=8)) == 8
    video = tmp_path / "a.mp4"
    video.write_bytes(b"12345")
    identity = file_identity(str(video))
    assert identity["path"] == str(video) and identity["size"] == 5 and isinstance(identity["mtime"], float)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        file_identity(str(tmp_path / "missing.mp4"))
    assert bytes_identity(b"abc", "row7")["sha256"].startswith("ba7816bf")
    segment, bucket = {"start": 0, "frames": 9, "fps": 16}, {"frames": 9, "height": 64, "width": 96, "crop": "center"}
    key = clip_key(identity, segment, bucket)
    assert key != clip_key(identity, {**segment, "start": 9}, bucket)
    assert text_key("a cat", {"id": "t5"}, 512) != text_key("a cat", {"id": "t5"}, 256)


def test_round_trip_fixed_and_ragged_over_flushes_and_groups(url):
    store = CacheStore.open(url, mode="a")
    fset = latents_set(store)
    keys = [f"clip{i:02d}" for i in range(11)]
    with store.writer(fset, ragged=("tokens",), max_segment_entries=3) as writer:
        for i, key in enumerate(keys):
            writer.add(key, "f9_h64_w96" if i % 3 else "f5_h32_w32", arrays_for(key), {"caption": f"caption {i}"})
        writer.flush()
        writer.add("late", "f5_h32_w32", arrays_for("late"))
    keys.append("late")
    assert store.keys(fset) == set(keys)  # the writing instance sees its own commits

    reader = CacheStore.open(url)
    [fset_read] = reader.feature_sets("latents")
    assert fset_read == fset and fset_read.attrs == {"kind": "latents", "identity": IDENTITY, **DESCRIPTION}
    assert reader.feature_sets("teacher") == []
    assert reader.keys(fset) == set(keys)
    for key in keys:
        got, want = reader.read(fset, key), arrays_for(key)
        assert set(got) == {"latents", "tokens"}
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            np.testing.assert_array_equal(got[name], want[name])
    entry = reader.entry(fset, "clip04")
    assert entry["caption"] == "caption 4" and entry["group"] == "f9_h64_w96"
    assert set(entry["checksums"]) == {"latents", "tokens"} and isinstance(entry["row"], int)
    with pytest.raises(KeyError, match="no committed entry 'nope'"):
        reader.read(fset, "nope")

    root = zarr.open_group(url if "://" in url else zarr.storage.LocalStore(url), mode="r")
    assert root.attrs.asdict() == {"schema_version": 1, "format": "crepa-cache"}
    array = root[f"{fset.path}/f9_h64_w96/{entry['segment']}/latents"]
    assert array.attrs["family"] == "tiny" and array.attrs["entry_shape"] == [4, 2, 8, 8]
    assert array.chunks == (1, 4, 2, 8, 8) and array.shards == array.shape

    info = reader.info()[fset.path]
    assert info["entries"] == 12 and info["groups"]["f5_h32_w32"]["entries"] == 5
    assert info["bytes"] == sum(g["bytes"] for g in info["groups"].values()) > 0
    assert reader.verify() == type(reader.verify())(checked=12, problems=[], orphans=[])


def test_plans_and_pickled_store(url):
    store = CacheStore.open(url, mode="a")
    store.write_plan("dataset-a", {"family": "wan", "clips": [{"key": "k"}]})
    store.write_plan("dataset-b", {"family": "wan", "clips": []})
    assert CacheStore.open(url).plans() == {
        "dataset-a": {"family": "wan", "clips": [{"key": "k"}]},
        "dataset-b": {"family": "wan", "clips": []},
    }
    write(url, ["k"])
    clone = pickle.loads(pickle.dumps(CacheStore.open(url)))
    np.testing.assert_array_equal(clone.read(latents_set(clone), "k")["latents"], arrays_for("k")["latents"])


def test_newest_commit_wins(tmp_path):
    url = str(tmp_path / "cache")
    first = CacheStore.open(url, mode="a")
    fset = latents_set(first)
    with first.writer(fset, writer_id="first") as writer:
        writer.add("k", "g", {"x": np.zeros(3, np.float32)})
    assert first.read(fset, "k")["x"].tolist() == [0, 0, 0]  # loads first's index before the second commit
    second = CacheStore.open(url, mode="a")
    with second.writer(fset, writer_id="second") as writer:
        writer.add("k", "g", {"x": np.ones(3, np.float32)}, {"run": 2})
    assert CacheStore.open(url).read(fset, "k")["x"].tolist() == [1, 1, 1]
    assert CacheStore.open(url).entry(fset, "k")["run"] == 2
    first.refresh()
    assert first.read(fset, "k")["x"].tolist() == [1, 1, 1]
    assert CacheStore.open(url).verify().checked == 1


def test_writer_refuses_inconsistent_entries(tmp_path):
    store = CacheStore.open(str(tmp_path / "cache"), mode="a")
    fset = latents_set(store)
    with store.writer(fset, ragged=("tokens",)) as writer:
        writer.add("a", "g", {"latents": np.zeros((2, 3), np.float16), "tokens": np.zeros((4, 5), np.float32)})
        writer.add("b", "g", {"latents": np.zeros((2, 3), np.float16), "tokens": np.zeros((1, 5), np.float32)})
        with pytest.raises(ValueError, match="same names, dtypes and shapes"):
            writer.add("c", "g", {"latents": np.zeros((2, 3), np.float32), "tokens": np.zeros((1, 5), np.float32)})
        with pytest.raises(ValueError, match="added twice"):
            writer.add("a", "g", {"latents": np.zeros((2, 3), np.float16), "tokens": np.zeros((1, 5), np.float32)})
        with pytest.raises(ValueError, match="reserved names"):
            writer.add("d", "g2", {"x": np.zeros(1)}, {"row": 3})
        with pytest.raises(ValueError, match="group 'a/b'"):
            writer.add("d", "a/b", {"x": np.zeros(1)})
    assert store.keys(fset) == {"a", "b"}
    with pytest.raises(ValueError, match="feature kind 'audio'"):
        store.feature_set("audio", {}, {})


def test_open_errors_name_the_cache_and_the_fix(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"no cache at {missing}; create one with `crepa precompute"):
        CacheStore.open(missing)
    with pytest.raises(ValueError, match="mode='w'"):
        CacheStore.open(missing, mode="w")

    url = str(tmp_path / "cache")
    CacheStore.open(url, mode="a")
    reader = CacheStore.open(url)
    with pytest.raises(PermissionError, match="read-only"):
        reader.writer(latents_set(CacheStore.open(url, mode="a")))
    with pytest.raises(LookupError, match="no teacher feature set"):
        reader.feature_set("teacher", {"encoder": "dinov2"}, {})

    zarr.open_group(zarr.storage.LocalStore(url), mode="r+").attrs["schema_version"] = 99
    with pytest.raises(ValueError, match="schema version 99 but this crepa reads version 1"):
        CacheStore.open(url)
    zarr.create_group(zarr.storage.LocalStore(str(tmp_path / "plain")))
    with pytest.raises(ValueError, match="not a crepa cache"):
        CacheStore.open(str(tmp_path / "plain"))


def test_verify_reports_corrupted_chunk_and_orphan_segment(tmp_path):
    url = str(tmp_path / "cache")
    keys = [f"clip{i}" for i in range(8)]
    fset = write(url, keys, per_segment=4)
    store = CacheStore.open(url)
    assert store.verify().ok

    victim = store.entry(fset, "clip0")
    array_dir = tmp_path / "cache" / fset.path / victim["group"] / victim["segment"] / "latents"
    [shard] = [p for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = os.urandom(64)
    shard.write_bytes(bytes(data))

    orphan = store.entry(fset, "clip7")
    (tmp_path / "cache" / "manifest" / fset.path / f"{orphan['segment']}.json").unlink()

    report = CacheStore.open(url).verify()
    assert not report.ok
    assert report.problems and all(victim["segment"] in p for p in report.problems)
    assert report.orphans == [f"{fset.path}/{orphan['group']}/{orphan['segment']}"]
    assert "clip7" not in CacheStore.open(url).keys(fset)  # uncommitted data is invisible


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_round_trips_verifies_and_catches_corruption(tmp_path, codec):
    url = str(tmp_path / "cache")
    store = CacheStore.open(url, mode="a")
    fset = latents_set(store)
    keys = [f"clip{i}" for i in range(5)]
    with store.writer(fset, ragged=("tokens",), max_segment_entries=2, codec=codec) as writer:
        for key in keys:
            writer.add(key, group_of(key), arrays_for(key))
    reader = CacheStore.open(url)
    for key in keys:
        for name, want in arrays_for(key).items():
            got = reader.read(fset, key)[name]
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
    assert reader.verify() == VerifyReport(checked=5, problems=[], orphans=[])

    entry = reader.entry(fset, "clip0")
    root = zarr.open_group(zarr.storage.LocalStore(url), mode="r")
    for name, itemsize in (("latents", 2), ("tokens", 4)):
        [sharding] = root[f"{fset.path}/{entry['group']}/{entry['segment']}/{name}"].metadata.codecs
        inner = {c.to_dict()["name"]: c.to_dict().get("configuration", {}) for c in sharding.codecs}
        assert codec in inner or (codec == "none" and set(inner) == {"bytes", "crc32c"})
        if codec == "blosc":  # byte shuffle over the dtype's item size
            assert inner["blosc"]["shuffle"] == "shuffle" and inner["blosc"]["typesize"] == itemsize

    shard_dir = Path(url) / fset.path / entry["group"] / entry["segment"] / "latents"
    [shard] = [p for p in shard_dir.rglob("*") if p.is_file() and p.name != "zarr.json"]
    data = bytearray(shard.read_bytes())
    data[8:40] = bytes(32)  # inside the first chunk's payload, whatever the codec
    shard.write_bytes(bytes(data))
    report = CacheStore.open(url).verify()
    assert not report.ok and all(entry["segment"] in p for p in report.problems)


def test_unknown_codec_names_the_allowed_ones(tmp_path):
    store = CacheStore.open(str(tmp_path / "cache"), mode="a")
    with pytest.raises(ValueError, match="codec 'lz4' is unknown; use one of zstd, blosc, none"):
        store.writer(latents_set(store), codec="lz4")


def test_two_processes_write_disjoint_keys(tmp_path):
    url = str(tmp_path / "cache")
    CacheStore.open(url, mode="a")
    keys = [f"clip{i:02d}" for i in range(24)]
    spawn = multiprocessing.get_context("spawn")
    workers = [
        spawn.Process(target=write, args=(url, keys[rank::2]), kwargs={"writer_id": f"rank{rank}", "per_segment": 3})
        for rank in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    store = CacheStore.open(url)
    fset = latents_set(store)
    assert store.keys(fset) == set(keys)
    assert {store.entry(fset, k)["segment"].split("-")[0] for k in keys} == {"rank0", "rank1"}
    report = store.verify()
    assert report.ok and report.checked == 24 and report.orphans == []


def test_kill_9_mid_run_loses_only_uncommitted_entries(tmp_path):
    url = str(tmp_path / "cache")
    keys = [f"clip{i:04d}" for i in range(40)]
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "cache_crash_writer.py"), url, str(len(keys)), "0.02"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.strip() == "committed 5":
                break
        proc.kill()  # SIGKILL: no cleanup, no flush
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -9

    store = CacheStore.open(url)
    fset = latents_set(store)
    committed = store.keys(fset)
    assert 5 <= len(committed) < len(keys)
    for key in committed:
        got = store.read(fset, key)
        for name, want in arrays_for(key).items():
            np.testing.assert_array_equal(got[name], want)
    report = store.verify()
    assert report.ok and report.problems == [] and report.checked == len(committed)
    manifests = list((tmp_path / "cache" / "manifest").rglob("*"))
    assert all(p.is_dir() or p.suffix == ".json" for p in manifests)  # no half-written commit left behind

    write(url, keys, per_segment=8)  # the rerun adds only what is missing
    rerun = CacheStore.open(url)
    assert rerun.keys(fset) == set(keys)
    assert {rerun.entry(fset, k)["segment"] for k in committed} == {store.entry(fset, k)["segment"] for k in committed}
    assert rerun.verify().ok
    json.dumps(rerun.info())  # the summary is plain JSON
