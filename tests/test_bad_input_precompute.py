"""Bad input to precompute: a clear error before any work, or a listed skip that keeps the good clips."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import write_dataset

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from crepa.errors import UserError
from precompute.config import PrecomputeConfig, TeacherSettings
from precompute.dataset_config import load_dataset_config
from precompute.pipeline import PrecomputeSummary, run_precompute
from precompute.plan import Skipped
from precompute.report import skip_counts
from precompute.sampling import VideoInfo, plan_segments


def config_for(dataset: str, out: str, models: dict, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(dataset_config=dataset, family="wan", out=out, model=models["wan"], device="cpu",
                            decode_workers=0, teacher=TeacherSettings(encoder=models["dinov2"], image_size=56), **kw)


def committed_keys(out: str, kind: str) -> list[str]:
    """Every key of every committed segment of `kind`, read from the manifest files (repeats kept)."""
    keys = []
    for folder, _, files in os.walk(Path(out) / "manifest" / kind):
        for name in files:
            if name.endswith(".json") and not name.startswith("."):
                keys += list(json.loads((Path(folder) / name).read_text())["entries"])
    return keys


def toml_with(tmp_path: Path, line: str) -> str:
    (tmp_path / "clips").mkdir(exist_ok=True)
    path = tmp_path / "dataset.toml"
    path.write_text(f"[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n\n[[datasets]]\n"
                    f"video_directory = \"clips\"\n{line}\n")
    return str(path)


@pytest.mark.parametrize(("line", "field", "words"), [
    ("source_fps = inf", "source_fps", "is inf"),
    ("source_fps = nan", "source_fps", "is nan"),
    ("source_fps = 1e9", "source_fps", "is 1000000000.0"),
    ("source_fps = 0", "source_fps", "is 0"),
    ("num_repeats = 1000000000000", "num_repeats", "is 1000000000000"),
    ("frame_sample = 1000000000", "frame_sample", "is 1000000000"),
    ("frame_stride = 1000000000", "frame_stride", "is 1000000000"),
    ("max_frames = 1000000000", "max_frames", "is 1000000000"),
    ("target_frames = [400000001]", "target_frames", "value 400000001 is more than"),
])
def test_nonsensical_numbers_fail_at_load_naming_file_table_and_field(tmp_path, line, field, words):
    path = toml_with(tmp_path, line)
    with pytest.raises(UserError) as caught:
        load_dataset_config(path, 4)
    message = str(caught.value)
    assert message.startswith(f"{path} [[datasets]] #1: {field} {words}"), message


def test_toml_syntax_error_names_file_line_and_column(tmp_path):
    path = toml_with(tmp_path, "name = = \"x\"")
    with pytest.raises(UserError, match=rf"^{path} is not valid TOML: .*line 7, column 8"):
        load_dataset_config(path, 4)


@pytest.mark.parametrize("extra", [
    'frame_extraction = "slide"\nsource_fps = 1000',
    'frame_extraction = "uniform"\nframe_sample = 100000',
    'frame_extraction = "chunk"\nsource_fps = 1000',
])
def test_segments_per_video_are_bounded_by_its_frames(tmp_path, extra):
    dataset = load_dataset_config(toml_with(tmp_path, extra), 4).datasets[0]
    plan = plan_segments(VideoInfo(num_frames=17, fps=16.0, width=64, height=48), dataset)
    assert 0 < len(plan.segments) <= 17
    assert len({segment.frame_indices for segment in plan.segments}) == len(plan.segments)


def write_duplicated_listings(tmp_path: Path, clips: int) -> str:
    """A dataset config whose folder is named again by a second table and whose clips 0 and 1 (clip 1 twice) are
    listed by a JSONL manifest in a third."""
    dataset = write_dataset(tmp_path, clips=clips)
    (tmp_path / "list.jsonl").write_text(
        '{"video_path": "clips/clip_01.mp4", "caption": "one"}\n' * 2
        + '{"video_path": "clips/clip_00.mp4", "caption": "zero"}\n'
    )
    with open(dataset, "a") as toml:
        toml.write('\n[[datasets]]\nname = "again"\nvideo_directory = "clips"\n'
                   '\n[[datasets]]\nname = "listed"\nvideo_jsonl_file = "list.jsonl"\n')
    return dataset


def test_duplicates_are_skipped_and_every_key_is_committed_once(tmp_path, tiny_models):
    dataset = write_duplicated_listings(tmp_path, clips=2)
    out = str(tmp_path / "cache")
    summary = run_precompute(config_for(dataset, out, tiny_models, segment_clips=1))
    reasons = sorted((s.source, s.reason) for s in summary.skipped)
    assert reasons == [
        ("again/clip_00.mp4", "duplicate of t/clip_00.mp4"),
        ("again/clip_01.mp4", "duplicate of t/clip_01.mp4"),
        ("listed/clips/clip_00.mp4", "duplicate of t/clip_00.mp4"),
        ("listed/clips/clip_01.mp4", "duplicate of t/clip_01.mp4"),
        ("listed/clips/clip_01.mp4", "duplicate of t/clip_01.mp4"),
    ]
    for kind in ("latents", "teacher"):
        keys = committed_keys(out, kind)
        assert len(keys) == len(set(keys)) == 2, kind
    (plan,) = CacheStore.open(out).plans().values()
    assert sorted((clip["dataset"], clip["source"]) for clip in plan["clips"]) == [("t", "clip_00.mp4"),
                                                                                   ("t", "clip_01.mp4")]
    assert len(CacheView(CacheStore.open(out), "wan").clips) == 2


def test_ranks_plan_each_duplicated_video_once_between_them(tmp_path):
    """Every listing of one video goes to one rank, which keeps it once: no key is committed by two ranks."""
    from precompute.plan import plan_clips

    dataset = write_duplicated_listings(tmp_path, clips=3)
    tables = load_dataset_config(dataset, 4).datasets
    keys = [clip.key for rank in range(2) for clip in plan_clips(tables, {}, 8, rank=rank, world=2)[0]]
    assert len(keys) == len(set(keys)) == 3
    shares = [len(plan_clips(tables, {}, 8, rank=rank, world=2)[0]) for rank in range(2)]
    assert sorted(shares) == [1, 2], "videos are still dealt out evenly"


def test_empty_captions_and_dangling_links_are_listed_as_skipped(tmp_path, tiny_models):
    dataset = write_dataset(tmp_path, clips=3)
    (tmp_path / "clips" / "clip_02.txt").write_text("  \n\t\n")
    os.symlink(tmp_path / "gone.mp4", tmp_path / "clips" / "link.mp4")
    out = str(tmp_path / "cache")
    summary = run_precompute(config_for(dataset, out, tiny_models))
    reasons = {s.source: s.reason for s in summary.skipped}
    assert reasons["t/clip_02.mp4"].startswith("empty caption")
    assert reasons["t/link.mp4"].startswith("broken link")
    assert len(reasons) == 2 and summary.computed["latents"] == 2

    toml = Path(dataset)
    toml.write_text(toml.read_text().replace("[general]\n", "[general]\nallow_empty_captions = true\n"))
    again = run_precompute(config_for(dataset, out, tiny_models))
    assert again.computed["latents"] == 1 and again.reused["latents"] == 2
    captions = sorted(clip.caption for clip in CacheView(CacheStore.open(out), "wan").clips)
    assert captions[0] == ""


@pytest.mark.parametrize(("make", "words"), [
    (lambda out: (out.mkdir(), (out / "notes.txt").write_text("mine")), "is not empty and is not a crepa cache"),
    (lambda out: out.write_text("a file"), "is a file"),
])
def test_out_that_is_not_a_cache_is_refused_and_left_alone(tmp_path, dataset, tiny_models, make, words):
    out = tmp_path / "out"
    make(out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=f"^--out {out} {words}"):
        run_precompute(config_for(dataset, str(out), tiny_models))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_names_the_folder(tmp_path, dataset, tiny_models):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(UserError, match=f"^--out {out} is not writable"):
            run_precompute(config_for(dataset, str(out), tiny_models))
    finally:
        out.chmod(0o755)


def test_full_disk_names_the_cache_and_the_bytes_still_to_write(tmp_path, dataset, tiny_models, monkeypatch):
    import zarr.storage._local as local

    put = local._put

    def full_for_teacher(path, value, exclusive=False):
        if "/teacher/" in str(path) and "/c/" in str(path):  # a teacher segment's data, not its metadata
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full_for_teacher)
    out = str(tmp_path / "cache")
    with pytest.raises(UserError, match=rf"^disk full writing the cache {out}: about [\d.]+ \w+ still to write"):
        run_precompute(config_for(dataset, out, tiny_models, segment_clips=1))
    monkeypatch.undo()
    summary = run_precompute(config_for(dataset, out, tiny_models))  # a rerun after freeing space resumes
    assert summary.computed["teacher"] == 3 and summary.computed["latents"] < 3


def test_the_skipped_list_counts_empty_captions_and_duplicates():
    summary = PrecomputeSummary(skipped=[Skipped("t/a.mp4", "empty caption; write one"),
                                         Skipped("t/b.mp4", "empty caption; write one"),
                                         Skipped("u/a.mp4", "duplicate of t/a.mp4"),
                                         Skipped("t/c.mp4", "cannot read video: broken")])
    assert skip_counts(summary) == " (2 empty captions, 1 duplicate)"
    assert skip_counts(PrecomputeSummary(skipped=[Skipped("t/c.mp4", "too short")])) == ""


def test_bad_images_are_skipped_with_reasons_and_strict_stops_at_one(tmp_path, tiny_models):
    from precompute.synthetic import write_captioned_images

    folder = tmp_path / "stills"
    good, cut, _ = write_captioned_images(folder, [(64, 48), (96, 72), (48, 64)], extension=".png")
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 2])  # the header reads, the pixels end early
    (folder / "noise.jpg").write_bytes(os.urandom(4096))
    (folder / "noise.txt").write_text("noise")
    (folder / "image_02.txt").unlink()
    os.symlink(tmp_path / "gone.png", folder / "link.png")
    dataset = tmp_path / "dataset.toml"
    dataset.write_text('[[datasets]]\nname = "s"\nimage_directory = "stills"\nresolutions = [[64, 48], [48, 64]]\n')
    out = str(tmp_path / "cache")
    summary = run_precompute(config_for(str(dataset), out, tiny_models))
    reasons = {s.source: s.reason for s in summary.skipped}
    assert sorted(reasons) == ["s/image_01.png", "s/image_02.png", "s/link.png", "s/noise.jpg"]
    assert reasons["s/noise.jpg"].startswith("cannot read image: cannot identify image file")
    assert "truncated" in reasons["s/image_01.png"]
    assert reasons["s/image_02.png"].startswith("missing caption file image_02.txt beside image_02.png")
    assert reasons["s/link.png"].startswith("broken link")
    assert summary.computed["latents"] == 1
    assert [clip.source for clip in CacheView(CacheStore.open(out), "wan").clips] == [good.name]

    with pytest.raises(RuntimeError, match=r"image_01.png: OSError: image file is truncated \(rerun without --strict"):
        run_precompute(config_for(str(dataset), str(tmp_path / "strict"), tiny_models, strict=True))
