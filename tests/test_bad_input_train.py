"""Bad caches at training time: batches that cannot fill, truncated shards, corrupted chunks; verify and repair."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal

import pytest
import torch
from click.testing import CliRunner
from test_train import train_config

from crepa.cache.rows import ShardRows
from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from crepa.cache.wds import iter_webdataset, read_index
from crepa.errors import UserError
from crepa_cli.main import main as crepa_cli
from precompute.config import PrecomputeConfig, TeacherSettings
from precompute.pipeline import run_precompute
from train.data import BucketBatchSampler
from train.loader import TrainData
from train.trainer import run_train


@contextlib.contextmanager
def deadline(seconds: int):
    """A run that would spin forever fails the test instead of hanging it."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def export_shards(cache: str, folder: str, maxcount: int = 1000) -> str:
    from crepa.cache.export import export_view

    export_view(cache, folder, family="wan", maxcount=maxcount)
    return folder


# ---- batches that no bucket can fill


@pytest.mark.parametrize("fmt, message", [
    ("zarr", r"f9_h48_w64: 3 clips.*--batch-size 8; use --batch-size 3 or less"),
    ("wds", r"hold 3 samples.*--batch-size 8 x 1 rank.*use --batch-size 3 or less"),
])
def test_batch_larger_than_every_bucket_fails_before_step_0(tmp_path, trained_cache, tiny_models, fmt, message):
    cache = trained_cache if fmt == "zarr" else export_shards(trained_cache, str(tmp_path / "shards"))
    out = str(tmp_path / "run")
    with deadline(30), pytest.raises(UserError, match=message):
        run_train(train_config(cache, tiny_models, out, batch_size=8))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_a_rank_without_batches_is_refused():
    sampler = BucketBatchSampler(["a"] * 3, [1] * 3, batch_size=2, seed=0, rank=1, world=2)
    with pytest.raises(UserError, match=r"1 batch.*2 rank"):
        sampler.check_not_empty()


def test_an_epoch_without_batches_stops_instead_of_spinning():
    data = TrainData(clips=1, incomplete=0, latent_channels=1, latent_frames=1, text_dim=1, text_length=1,
                     teacher_dim=None, teacher_frames=None, batches_per_epoch=1, loader_for_epoch=lambda e, c: [])
    with deadline(30), pytest.raises(UserError, match="no batch"):
        next(data.iterate(0, 0))


# ---- truncated shards


def truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("where", ["reader", "train"])
def test_truncated_shard_is_named_with_the_fix(tmp_path, trained_cache, tiny_models, where):
    folder = export_shards(trained_cache, str(tmp_path / "shards"), maxcount=1)
    last = read_index(folder).urls[-1]
    truncate(last)
    with deadline(120), pytest.raises(UserError, match=rf"{os.path.basename(last)}.*truncated.*crepa cache export"):
        if where == "reader":
            list(iter_webdataset([last]))
        else:
            run_train(train_config(folder, tiny_models, str(tmp_path / "run")))


# ---- corrupted chunks


def corrupt_clip(cache: str, index: int = -1, kind: str = "teacher", array: str = "patch") -> tuple[str, str]:
    """Flip one bit in the middle of one clip's chunk of `array`; returns (clip key, clip source)."""
    store = CacheStore.open(cache)
    view = CacheView(store, "wan", None, True)
    clip = view.clips[index]
    fset = {"teacher": view.teacher, "latents": view.latents}[kind]
    entry = store.entry(fset, clip.key)
    rows = store._array(f"{fset.path}/{entry['group']}/{entry['segment']}/{array}")
    assert isinstance(rows, ShardRows)
    offset, length = (int(v) for v in rows._index(0)[entry["row"]])
    path = os.path.join(cache, rows._shard_key(0))
    with open(path, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)[0]
        f.seek(offset + length // 2)
        f.write(bytes([byte ^ 0x10]))
    return clip.key, clip.source


@pytest.fixture
def corrupted(tmp_path, trained_cache) -> tuple[str, str, str]:
    cache = str(tmp_path / "cache")
    shutil.copytree(trained_cache, cache)
    return (cache, *corrupt_clip(cache))


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupted_chunk_mid_training_stops_with_one_line_naming_the_clip(tmp_path, corrupted, tiny_models,
                                                                           workers):
    cache, key, source = corrupted
    out = str(tmp_path / "run")
    with pytest.raises(UserError) as caught:
        run_train(train_config(cache, tiny_models, out, max_train_steps=6, dataloader_num_workers=workers))
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for part in (key, source, "patch", "crepa cache verify", "crepa cache repair"):
        assert part in message


def test_verify_names_clip_array_and_repair_command(corrupted):
    cache, key, source = corrupted
    report = CacheStore.open(cache).verify()
    assert len(report.problems) == 1
    problem = report.problems[0]
    for part in (key, source, "patch", f"crepa cache repair {cache}"):
        assert part in problem


def test_repair_then_precompute_recomputes_only_the_corrupted_clip(corrupted, trained_cache, tiny_models):
    cache, key, source = corrupted
    result = CliRunner().invoke(crepa_cli, ["cache", "repair", cache])
    assert result.exit_code == 0, result.output
    dataset_config = os.path.join(os.path.dirname(trained_cache), "dataset.toml")
    assert key in result.output and dataset_config in result.output and "crepa precompute" in result.output
    store = CacheStore.open(cache)
    view = CacheView(store, "wan", None, True)
    assert key not in store.keys(view.teacher) and key in store.keys(view.latents)
    assert [c.key for c in view.incomplete] == [key]

    summary = run_precompute(PrecomputeConfig(
        dataset_config=dataset_config, family="wan", out=cache, model=tiny_models["wan"], device="cpu",
        decode_workers=0, teacher=TeacherSettings(encoder=tiny_models["dinov2"], image_size=56)))
    assert summary.computed == {"latents": 0, "teacher": 1, "text": 0}
    assert CacheStore.open(cache).verify().ok
    again = CliRunner().invoke(crepa_cli, ["cache", "repair", cache])
    assert again.exit_code == 0 and "nothing to repair" in again.output


def test_repair_keeps_a_clean_cache_unchanged(tmp_path, trained_cache):
    cache = str(tmp_path / "cache")
    shutil.copytree(trained_cache, cache)
    before = {p: open(os.path.join(r, p), "rb").read() for r, _, files in os.walk(cache) for p in files}
    assert CacheStore.open(cache, mode="a").repair().removed == []
    after = {p: open(os.path.join(r, p), "rb").read() for r, _, files in os.walk(cache) for p in files}
    assert before == after


def test_dataloader_worker_error_reaches_the_trainer_as_its_message(tmp_path, trained_cache):
    from train.loader import unwrap_worker_error

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            raise UserError("clip k array patch is corrupted", fix="run `crepa cache verify`")

    loader = torch.utils.data.DataLoader(Broken(), num_workers=1)
    with pytest.raises(UserError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)
    assert str(unwrap_worker_error(caught.value)) == "clip k array patch is corrupted: run `crepa cache verify`"

