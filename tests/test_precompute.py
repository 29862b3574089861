"""Precompute end to end on tiny real models and real mp4 files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import write_dataset

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from precompute.config import PrecomputeConfig, TeacherSettings
from precompute.pipeline import PrecomputeSummary, run_precompute
from precompute.teacher import TeacherEncoder


def config_for(dataset: str, out: str, models: dict, **kw) -> PrecomputeConfig:
    teacher = kw.pop("teacher", TeacherSettings(encoder=models["dinov2"], image_size=56))
    return PrecomputeConfig(dataset_config=dataset, family="wan", out=out, model=models["wan"], device="cpu",
                            decode_workers=kw.pop("decode_workers", 0), teacher=teacher, **kw)


def test_shapes_dtypes_and_self_description(tmp_path, dataset, tiny_models):
    out = str(tmp_path / "cache")
    summary = run_precompute(config_for(dataset, out, tiny_models, decode_workers=1))
    assert summary.computed == {"latents": 3, "teacher": 3, "text": 4}  # 3 captions and the empty prompt
    view = CacheView(CacheStore.open(out), "wan")
    assert len(view.clips) == 3 and not view.incomplete
    sample = view.load(view.clips[0])
    # 9 pixel frames -> 3 latent frames; 48x64 pixels / 8 -> 6x8; 4 latent channels
    assert sample["latents"].shape == (4, 3, 6, 8) and sample["latents"].dtype == np.float32
    # aspect resize of 48x64 to ~56^2 pixels: 42x70 -> 3x5 patches of width 32
    assert sample["teacher"].shape == (3, 3, 5, 32) and sample["teacher"].dtype == np.float16
    assert sample["text"].ndim == 2 and sample["text"].shape[1] == 16 and sample["text"].dtype == np.float16

    root = zarr.open_group(out, mode="r")  # plain zarr can open and describe it
    assert root.attrs["schema_version"] == 1
    teacher_attrs = view.teacher.attrs
    assert teacher_attrs["encoder"] == tiny_models["dinov2"] and teacher_attrs["dim"] == 32
    assert "latent frame 0 <- pixel frame 0" in teacher_attrs["temporal_mapping"]
    assert CacheStore.open(out).verify().ok


def flat_clip_dataset(folder: Path) -> str:
    from precompute.synthetic import flat_colour_clip, write_video

    colours = [(20 * i, 255 - 20 * i, (97 * i) % 256) for i in range(9)]
    (folder / "clips").mkdir(parents=True)
    write_video(str(folder / "clips" / "flat.mp4"), flat_colour_clip(colours, 48, 64), fps=8)
    (folder / "clips" / "flat.txt").write_text("a flat colour video")
    config = folder / "dataset.toml"
    config.write_text('[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n[[datasets]]\n'
                      'video_directory = "clips"\n')
    return str(config)


@pytest.mark.parametrize("mode", ["stride", "mean"])
def test_temporal_mapping_of_teacher_frames(tmp_path, tiny_models, mode):
    from precompute.decode import decode_segment

    dataset = flat_clip_dataset(tmp_path)
    settings = TeacherSettings(encoder=tiny_models["dinov2"], image_size=56, frames=mode, dtype="float32")
    out = str(tmp_path / "cache")
    run_precompute(config_for(dataset, out, tiny_models, teacher=settings))
    view = CacheView(CacheStore.open(out), "wan")
    stored = view.load(view.clips[0])["teacher"]  # (3, ht, wt, D)

    frames = decode_segment(str(tmp_path / "clips" / "flat.mp4"), tuple(range(9)), (64, 48), "center")
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    per_frame, _ = TeacherEncoder(settings, torch.device("cpu"), torch.float32).frame_features(pixels)
    if mode == "stride":  # latent frame i <- pixel frame 4i
        expected = per_frame[[0, 4, 8]]
    else:  # latent frame i <- mean of pixel frames 4(i-1)+1 .. 4i
        expected = torch.stack([per_frame[0], per_frame[1:5].mean(0), per_frame[5:9].mean(0)])
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-4)
    assert not np.allclose(stored[1], stored[2])


def test_teacher_takes_uint8_frames_in_balanced_batches(tiny_models):
    from precompute.synthetic import moving_shapes_clip

    settings = TeacherSettings(encoder=tiny_models["dinov2"], image_size=56)
    encoder = TeacherEncoder(settings, torch.device("cpu"), torch.float32, batch_size=4)
    batches = []
    encoder.model.register_forward_pre_hook(lambda _, args, kwargs: batches.append(len(kwargs["pixel_values"])),
                                            with_kwargs=True)
    frames = torch.from_numpy(moving_shapes_clip(5, 48, 64)).permute(0, 3, 1, 2)  # (5, 3, 48, 64) uint8
    from_uint8 = encoder.frame_features(frames)
    from_float = encoder.frame_features(frames.float() / 255.0)
    assert batches == [3, 2, 3, 2]  # 5 frames in batches of at most 4: 3 + 2, not 4 + 1
    for ours, reference in zip(from_uint8, from_float, strict=True):
        torch.testing.assert_close(ours, reference)


def test_a_failed_segment_write_stops_the_run_and_commits_nothing_half_written(tmp_path, dataset, tiny_models,
                                                                               monkeypatch):
    import crepa.cache.store as store_module

    write_json = store_module.write_json

    def full_disk_for_teacher_manifests(fs, path, obj):
        if "/manifest/teacher/" in path:
            raise OSError("No space left on device")
        return write_json(fs, path, obj)

    monkeypatch.setattr(store_module, "write_json", full_disk_for_teacher_manifests)
    out = str(tmp_path / "cache")
    with pytest.raises(OSError, match="No space left on device"):  # raised on the writer thread, surfaced here
        run_precompute(config_for(dataset, out, tiny_models, segment_clips=1))
    monkeypatch.undo()
    store = CacheStore.open(out)
    report = store.verify()
    assert store.keys(store.feature_sets("teacher")[0]) == set()
    assert report.problems == [] and report.orphans  # the arrays were written, never committed

    summary = run_precompute(config_for(dataset, out, tiny_models))
    assert summary.computed["teacher"] == 3 and summary.computed["latents"] < 3  # latents committed before stay
    assert CacheStore.open(out).verify().ok


def test_efficiency_leaves_model_loading_out():
    summary = PrecomputeSummary(forward_seconds={"vae": 6.0, "encoder": 3.0}, load_seconds={"vae": 10.0},
                                wall_seconds=20.0)
    assert summary.efficiency == pytest.approx(0.9)


def test_second_encoder_computes_only_the_new_teacher_set(tmp_path, dataset, tiny_models):
    out = str(tmp_path / "cache")
    run_precompute(config_for(dataset, out, tiny_models))
    again = run_precompute(config_for(dataset, out, tiny_models))
    assert again.computed == {"latents": 0, "teacher": 0, "text": 0}
    other = TeacherSettings(encoder=tiny_models["dinov2_reg"], image_size=56)
    files = {path: path.stat().st_mtime_ns for path in Path(out).rglob("*")}
    planned = run_precompute(config_for(dataset, out, tiny_models, teacher=other, dry_run=True))
    assert planned.computed == {"latents": 0, "teacher": 3, "text": 0}
    assert {path: path.stat().st_mtime_ns for path in Path(out).rglob("*")} == files, "a dry run changes nothing"
    second = run_precompute(config_for(dataset, out, tiny_models, teacher=other))
    assert second.computed == {"latents": 0, "teacher": 3, "text": 0}
    store = CacheStore.open(out)
    assert len(store.feature_sets("teacher")) == 2
    with pytest.raises(ValueError, match="several teacher sets"):
        CacheView(store, "wan")
    view = CacheView(store, "wan", encoder=tiny_models["dinov2_reg"])
    assert view.teacher.attrs["register_tokens"] == 4 and len(view.clips) == 3


def test_changed_caption_is_recomputed_not_served_stale(tmp_path, dataset, tiny_models):
    out = str(tmp_path / "cache")
    run_precompute(config_for(dataset, out, tiny_models))
    (tmp_path / "clips" / "clip_01.txt").write_text("a white box sliding left")
    summary = run_precompute(config_for(dataset, out, tiny_models))
    assert summary.computed == {"latents": 0, "teacher": 0, "text": 1}
    view = CacheView(CacheStore.open(out), "wan")
    captions = {clip.source.rsplit("/", 1)[-1]: clip.caption for clip in view.clips}
    assert captions["clip_01.mp4"] == "a white box sliding left"


def test_bad_clips_are_skipped_with_reasons(tmp_path, tiny_models):
    dataset = write_dataset(tmp_path, clips=2)
    (tmp_path / "clips" / "broken.mp4").write_bytes(os.urandom(4096))
    (tmp_path / "clips" / "broken.txt").write_text("noise")
    from precompute.synthetic import moving_shapes_clip, write_video

    write_video(str(tmp_path / "clips" / "short.mp4"), moving_shapes_clip(5, 48, 64), fps=16)
    (tmp_path / "clips" / "short.txt").write_text("too short")
    write_video(str(tmp_path / "clips" / "nocaption.mp4"), moving_shapes_clip(9, 48, 64), fps=16)
    out = str(tmp_path / "cache")
    summary = run_precompute(config_for(dataset, out, tiny_models))
    reasons = {Path(s.source).name: s.reason for s in summary.skipped}
    assert set(reasons) == {"broken.mp4", "short.mp4", "nocaption.mp4"}
    assert "9" in reasons["short.mp4"] and "5" in reasons["short.mp4"]
    assert "caption" in reasons["nocaption.mp4"]
    assert summary.computed["latents"] == 2
    assert len(CacheView(CacheStore.open(out), "wan").clips) == 2


def test_wrong_target_frames_and_bucket_fail_before_models_load(tmp_path, tiny_models):
    bad_frames = write_dataset(tmp_path / "a", config_extra="")
    Path(bad_frames).write_text(Path(bad_frames).read_text().replace("[9]", "[8]"))
    with pytest.raises(ValueError, match="target_frames"):
        run_precompute(config_for(bad_frames, str(tmp_path / "c1"), tiny_models))
    bad_bucket = write_dataset(tmp_path / "b")
    Path(bad_bucket).write_text(Path(bad_bucket).read_text().replace("[[64, 48]]", "[[60, 48]]"))
    with pytest.raises(ValueError, match=r"not a multiple of 16"):
        run_precompute(config_for(bad_bucket, str(tmp_path / "c2"), tiny_models))


def test_memory_url_cache(tmp_path, dataset, tiny_models):
    url = f"memory://crepa-test-{os.getpid()}"
    run_precompute(config_for(dataset, url, tiny_models))
    view = CacheView(CacheStore.open(url), "wan")
    assert len(view.clips) == 3 and view.load(view.clips[0])["latents"].shape == (4, 3, 6, 8)


def precompute_cli(dataset: str, out: str, models: dict, *extra: str, env: dict | None = None) -> list[str]:
    return [sys.executable, "-m", "crepa_cli", "precompute", "--config", dataset, "--family", "wan", "--out", out,
            "--model", models["wan"], "--encoder", models["dinov2"], "--encoder-image-size", "56", "--device", "cpu",
            "--decode-workers", "0", *extra]


def test_killed_run_resumes_without_recomputing(tmp_path, tiny_models):
    dataset = write_dataset(tmp_path, clips=8)
    out = str(tmp_path / "cache")
    process = subprocess.Popen(precompute_cli(dataset, out, tiny_models, "--segment-clips", "1"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = Path(out) / "manifest" / "teacher"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if len(list(manifest.rglob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = CacheStore.open(out)
    done = len(store.keys(store.feature_sets("teacher")[0]))
    assert 2 <= done < 8, "the kill should land mid-run"
    assert store.verify().problems == []

    summary = run_precompute(config_for(dataset, out, tiny_models))
    assert summary.computed["teacher"] == 8 - done
    assert len(CacheView(CacheStore.open(out), "wan").clips) == 8
    assert CacheStore.open(out).verify().ok


def test_two_processes_equal_one(tmp_path, tiny_models):
    dataset = write_dataset(tmp_path, clips=4)
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    run_precompute(config_for(dataset, single, tiny_models))
    procs = [subprocess.Popen(precompute_cli(dataset, double, tiny_models),
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"}) for r in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    one, two = CacheView(CacheStore.open(single), "wan"), CacheView(CacheStore.open(double), "wan")
    assert [c.key for c in one.clips] == [c.key for c in two.clips] and len(two.clips) == 4
    for clip in one.clips:
        a, b = one.load(clip), two.load(clip)
        for name in ("latents", "teacher", "text"):
            np.testing.assert_array_equal(a[name], b[name])


def test_webdataset_export_reads_back(tmp_path, trained_cache):
    import webdataset as wds

    from crepa.cache.export import export_view

    shards = export_view(trained_cache, str(tmp_path / "shards"), family="wan", maxcount=2)
    assert len(shards) == 2
    view = CacheView(CacheStore.open(trained_cache), "wan")
    seen = 0
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        expected = view.load(next(c for c in view.clips if c.key == sample["__key__"]))
        np.testing.assert_array_equal(sample["latents.npy"], expected["latents"])
        np.testing.assert_array_equal(sample["teacher.npy"], expected["teacher"])
        np.testing.assert_array_equal(sample["text.npy"], expected["text"])
        seen += 1
    assert seen == 3


@pytest.mark.parametrize("codec", ["none", "blosc"])
def test_codec_option_writes_arrays_the_view_reads_back(tmp_path, dataset, tiny_models, codec):
    reference, other = str(tmp_path / "zstd"), str(tmp_path / codec)
    run_precompute(config_for(dataset, reference, tiny_models))
    run_precompute(config_for(dataset, other, tiny_models, codec=codec))
    views = [CacheView(CacheStore.open(path), "wan") for path in (reference, other)]
    for clip in views[0].clips:
        want, got = views[0].load(clip), views[1].load(clip)
        for name in ("latents", "text", "teacher"):
            np.testing.assert_array_equal(got[name], want[name])
    teacher = views[1].teacher
    entry = views[1].store.entry(teacher, views[1].clips[0].key)
    array = zarr.open_array(f"{other}/{teacher.path}/{entry['group']}/{entry['segment']}/patch", mode="r")
    names = {type(c).__name__ for c in array.metadata.codecs[0].codecs}
    assert ("BloscCodec" in names) == (codec == "blosc") and "ZstdCodec" not in names


def test_unknown_codec_is_refused_with_the_choices(tmp_path, dataset, tiny_models):
    with pytest.raises(ValueError, match="--codec='lz4'; use one of zstd, blosc, none"):
        config_for(dataset, str(tmp_path / "c"), tiny_models, codec="lz4")


def test_int8_teacher_halves_the_bytes_and_reads_back_as_close_float16(tmp_path, dataset, tiny_models):
    from train.config import TrainConfig
    from train.trainer import run_train

    fp16, int8 = str(tmp_path / "fp16"), str(tmp_path / "int8")
    run_precompute(config_for(dataset, fp16, tiny_models))
    settings = TeacherSettings(encoder=tiny_models["dinov2"], image_size=56, dtype="int8")
    estimate = run_precompute(config_for(dataset, int8, tiny_models, teacher=settings, dry_run=True)).estimated_bytes
    run_precompute(config_for(dataset, int8, tiny_models, teacher=settings))
    reference, quantised = (CacheView(CacheStore.open(path), "wan") for path in (fp16, int8))
    for clip in reference.clips:
        want = reference.load(clip)["teacher"].astype(np.float32)
        got = quantised.load(clip)["teacher"]
        assert got.dtype == np.float16 and got.shape == want.shape
        cosine = (want * got).sum(-1) / np.linalg.norm(want, axis=-1) / np.linalg.norm(got.astype(np.float32), axis=-1)
        assert cosine.min() > 0.999
    stored = quantised.store.read(quantised.teacher, quantised.clips[0].key)
    assert stored["patch"].dtype == np.int8 and stored["patch_scale"].shape == (*stored["patch"].shape[:-1], 1)
    assert stored["cls"].dtype == np.float16
    written = sum(array.nbytes for clip in quantised.clips
                  for array in quantised.store.read(quantised.teacher, clip.key).values())
    assert estimate["teacher"] == written
    run_train(TrainConfig(cache=int8, family="wan", model=tiny_models["wan"], output_dir=str(tmp_path / "run"),
                          crepa_block_index=1, max_train_steps=2, batch_size=1))


def test_two_configs_of_the_same_file_name_both_reach_training(tmp_path, tiny_models):
    first, second = write_dataset(tmp_path / "a", clips=2), write_dataset(tmp_path / "b", clips=3)
    assert Path(first).name == Path(second).name == "dataset.toml"
    out = str(tmp_path / "cache")
    for dataset in (first, second):
        run_precompute(config_for(dataset, out, tiny_models, skip_teacher=True))
    store = CacheStore.open(out)
    assert len(store.plans()) == 2 and {plan["name"] for plan in store.plans().values()} == {"dataset"}
    assert len(CacheView(store, "wan", with_teacher=False).clips) == 5
    run_precompute(config_for(first, out, tiny_models, skip_teacher=True))  # a rerun rewrites its own plan
    assert len(CacheStore.open(out).plans()) == 2


def test_an_edited_config_replaces_its_old_plan(tmp_path, tiny_models):
    dataset = write_dataset(tmp_path, clips=3)
    out = str(tmp_path / "cache")
    run_precompute(config_for(dataset, out, tiny_models, skip_teacher=True))
    Path(dataset).write_text(Path(dataset).read_text().replace('name = "t"', 'name = "t"\nmax_frames = 100'))
    for clip in ("clip_01", "clip_02"):  # the edited config no longer lists these
        (tmp_path / "clips" / f"{clip}.txt").unlink()
    run_precompute(config_for(dataset, out, tiny_models, skip_teacher=True))
    assert len(CacheView(CacheStore.open(out), "wan", with_teacher=False).clips) == 1


def test_one_config_precomputed_with_two_models_keeps_both_plans(tmp_path, tiny_models):
    from crepa.families import get_family
    from crepa.tiny_models import save_tiny_pipeline

    dataset = write_dataset(tmp_path, clips=3)
    out = str(tmp_path / "cache")
    other = {**tiny_models, "wan": save_tiny_pipeline(get_family("wan"), str(tmp_path / "wan_b"), seed=1)}
    for models in (tiny_models, other):
        run_precompute(config_for(dataset, out, models, skip_teacher=True))
    plans = CacheStore.open(out).plans().values()
    assert len({plan["latents_set"] for plan in plans}) == 2
    assert [len(plan["clips"]) for plan in plans] == [3, 3]


def test_webdataset_input_is_read_by_the_decode_workers(tmp_path, tiny_models):
    import webdataset as wds

    from precompute.synthetic import moving_shapes_clip, write_video

    with wds.TarWriter(str(tmp_path / "in-000.tar")) as writer:
        for i in range(2):
            write_video(str(tmp_path / f"{i}.mp4"), moving_shapes_clip(9, 48, 64, seed=i), fps=8)
            writer.write({"__key__": f"v{i}", "mp4": (tmp_path / f"{i}.mp4").read_bytes(), "txt": f"clip {i}"})
    config = tmp_path / "shards.toml"
    config.write_text('[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n[[datasets]]\n'
                      'webdataset = "in-000.tar"\n')
    out = str(tmp_path / "cache")
    summary = run_precompute(config_for(str(config), out, tiny_models, skip_teacher=True, decode_workers=1))
    assert summary.computed == {"latents": 2, "teacher": 0, "text": 3} and not summary.skipped  # + ""
    assert len(CacheView(CacheStore.open(out), "wan", with_teacher=False).clips) == 2


@pytest.mark.parametrize("source_fps, expected", [(None, 16.0), (8, 8.0)], ids=["source", "resampled"])
def test_each_clip_records_the_frame_rate_of_its_frames(tmp_path, tiny_models, source_fps, expected):
    import webdataset as wds

    from crepa.cache.export import export_view

    extra = f"source_fps = {source_fps}" if source_fps else ""
    out = str(tmp_path / "cache")
    run_precompute(config_for(write_dataset(tmp_path, clips=2, config_extra=extra), out, tiny_models))
    # the manifest is plain JSON: every latents entry's meta carries the rate the clip's frames were sampled at
    manifests = list((tmp_path / "cache" / "manifest" / "latents").glob("*/*.json"))
    entries = [entry for path in manifests for entry in json.loads(path.read_text())["entries"].values()]
    assert len(entries) == 2 and [entry["meta"]["fps"] for entry in entries] == [expected] * 2
    view = CacheView(CacheStore.open(out), "wan")
    assert [view.load(clip)["fps"] for clip in view.clips] == [expected] * 2
    shards = export_view(out, str(tmp_path / "shards"), family="wan")
    assert [sample["json"]["fps"] for sample in wds.WebDataset(shards, shardshuffle=False).decode()] == [expected] * 2
