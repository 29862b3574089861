"""Every source kind yields its videos with identity and caption; missing captions are reported, not raised."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pytest
import webdataset
from fsspec import open as open_file

from precompute.dataset_config import DatasetConfig, load_dataset_config
from precompute.decode import read_video
from precompute.sampling import probe_video
from precompute.sources import iter_videos
from precompute.synthetic import moving_shapes_clip, write_video


def make_clip(path: Path, seed: int = 0, frames: int = 9) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, moving_shapes_clip(frames, 16, 16, seed), fps=8)
    return path


def load_one(tmp_path: Path, source_lines: str) -> DatasetConfig:
    config = tmp_path / "data.toml"
    config.write_text(f"[[datasets]]\n{source_lines}\nresolutions = [[16, 16]]\ntarget_frames = [9]\n")
    return load_dataset_config(str(config), temporal_compression=4).datasets[0]


def test_video_directory_reads_sidecar_captions_and_reports_missing_ones(tmp_path):
    make_clip(tmp_path / "clips" / "b.mp4", seed=1)
    make_clip(tmp_path / "clips" / "nested" / "a.mov", seed=2)
    (tmp_path / "clips" / "b.txt").write_text("  a red disc  \n")
    (tmp_path / "clips" / "nested" / "a.txt").write_text("boxes")
    make_clip(tmp_path / "clips" / "c.mp4", seed=3)
    (tmp_path / "clips" / "._b.mp4").write_bytes(b"resource fork")  # macOS litter, not a video
    (tmp_path / "clips" / "notes.md").write_text("not a video")

    items = list(iter_videos(load_one(tmp_path, 'video_directory = "clips"')))
    assert [item.name for item in items] == ["b.mp4", "c.mp4", "nested/a.mov"]
    b, c, a = items
    assert (b.caption, b.caption_error, a.caption) == ("a red disc", None, "boxes")
    assert c.caption is None and "missing caption file c.txt" in c.caption_error
    assert b.dataset == "clips" and b.video == str(tmp_path / "clips" / "b.mp4")
    assert b.identity["path"] == b.video and b.identity["size"] == os.path.getsize(b.video)
    assert probe_video(a.video).num_frames == 9


def test_jsonl_resolves_paths_against_its_folder(tmp_path):
    make_clip(tmp_path / "meta" / "videos" / "one.mp4")
    absolute = make_clip(tmp_path / "elsewhere" / "two.mp4", seed=4)
    lines = [
        {"video_path": "videos/one.mp4", "caption": "first"},
        {"video_path": str(absolute)},
    ]
    (tmp_path / "meta" / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    one, two = iter_videos(load_one(tmp_path, 'video_jsonl_file = "meta/list.jsonl"'))
    assert one.video == str(tmp_path / "meta" / "videos" / "one.mp4") and one.caption == "first"
    assert one.name == "videos/one.mp4" and one.dataset == "list"
    assert two.video == str(absolute) and two.caption is None
    assert 'list.jsonl line 2 has no "caption" string' in two.caption_error

    (tmp_path / "meta" / "list.jsonl").write_text('{"video_path": "videos/one.mp4", "caption": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="list.jsonl line 2 is not valid JSON"):
        list(iter_videos(load_one(tmp_path, 'video_jsonl_file = "meta/list.jsonl"')))
    (tmp_path / "meta" / "list.jsonl").write_text('{"video_path": "videos/gone.mp4", "caption": "x"}\n')
    with pytest.raises(FileNotFoundError, match="line 1: video .*gone.mp4 does not exist"):
        list(iter_videos(load_one(tmp_path, 'video_jsonl_file = "meta/list.jsonl"')))


def test_hf_dataset_with_path_column_and_with_video_bytes(tmp_path):
    make_clip(tmp_path / "hf_paths" / "videos" / "one.mp4")
    rows = {"clip": ["videos/one.mp4", "videos/one.mp4"], "text": ["a caption", None]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hf_paths"))
    dataset = load_one(tmp_path, 'hf_dataset = "hf_paths"\nvideo_column = "clip"\ncaption_column = "text"')
    first, second = iter_videos(dataset)
    assert first.video == str(tmp_path / "hf_paths" / "videos" / "one.mp4") and first.caption == "a caption"
    assert first.identity["size"] == os.path.getsize(first.video)
    assert second.caption is None and "row 1 has no caption in column 'text'" in second.caption_error

    data = make_clip(tmp_path / "raw.mp4", seed=5).read_bytes()
    features = datasets.Features({"video": datasets.Video(), "caption": datasets.Value("string")})
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"video": [{"bytes": data, "path": "raw.mp4"}], "caption": ["c"]}, features
            )
        }
    )
    splits.save_to_disk(str(tmp_path / "hf_bytes"))
    (item,) = iter_videos(load_one(tmp_path, 'hf_dataset = "hf_bytes"'))
    assert not isinstance(item.video, bytes) and read_video(item.video) == data  # a row reference, read on demand
    assert item.name == "raw.mp4" and item.caption == "c"
    assert set(item.identity) == {"name", "sha256"}
    assert probe_video(item.video).num_frames == 9

    with pytest.raises(ValueError, match="hf_split 'test' is not in .*; use one of train"):
        list(iter_videos(load_one(tmp_path, 'hf_dataset = "hf_bytes"\nhf_split = "test"')))
    with pytest.raises(ValueError, match="caption_column 'caption' is not a column of .*columns: clip, text"):
        list(iter_videos(load_one(tmp_path, 'hf_dataset = "hf_paths"\nvideo_column = "clip"')))


def test_webdataset_samples_carry_bytes_and_captions(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4").read_bytes()
    with webdataset.TarWriter(str(tmp_path / "shard-000.tar")) as writer:
        writer.write({"__key__": "s0", "mp4": clip, "txt": "first caption"})
        writer.write({"__key__": "s1", "mp4": clip})
    with webdataset.TarWriter(str(tmp_path / "shard-001.tar")) as writer:
        writer.write({"__key__": "s2", "mp4": clip, "txt": "third"})
    items = list(iter_videos(load_one(tmp_path, 'webdataset = "shard-{000..001}.tar"')))
    assert [item.name for item in items] == ["shard-000.tar/s0", "shard-000.tar/s1", "shard-001.tar/s2"]
    assert [item.caption for item in items] == ["first caption", None, "third"]
    assert "sample shard-000.tar/s1 has no .txt member" in items[1].caption_error
    assert not any(isinstance(item.video, bytes) for item in items)  # member references, read on demand
    assert all(read_video(item.video) == clip and item.dataset == "shard" for item in items)
    assert items[0].identity != items[2].identity  # same bytes, different sample

    with webdataset.TarWriter(str(tmp_path / "frames.tar")) as writer:
        writer.write({"__key__": "s0", "jpg": b"\xff\xd8", "txt": "x"})
    with pytest.raises(ValueError, match=r"sample frames.tar/s0 has no .mp4 member \(it has: jpg, txt\)"):
        list(iter_videos(load_one(tmp_path, 'webdataset = "frames.tar"')))


def test_an_empty_source_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="dataset 'empty' holds no videos; check its video_directory"):
        list(iter_videos(load_one(tmp_path, 'video_directory = "empty"')))


def write_shards(tmp_path: Path, samples: int) -> list[bytes]:
    """`samples` distinct captioned videos over two shards; returns the videos' bytes."""
    clips = [make_clip(tmp_path / "raw" / f"{i}.mp4", seed=i).read_bytes() for i in range(samples)]
    for shard, part in enumerate((clips[: samples // 2], clips[samples // 2:])):
        with webdataset.TarWriter(str(tmp_path / f"shard-{shard:03d}.tar")) as writer:
            for i, clip in enumerate(part):
                writer.write({"__key__": f"s{shard}_{i}", "mp4": clip, "txt": f"caption {shard} {i}"})
    return clips


def test_planned_byte_source_clips_hold_references_not_videos(tmp_path):
    import pickle

    from precompute.plan import plan_clips

    write_shards(tmp_path, 4)
    clips, skipped = plan_clips([load_one(tmp_path, 'webdataset = "shard-{000..001}.tar"')], {}, 8)
    assert len(clips) == 4 and not skipped
    for clip in clips:
        assert not isinstance(clip.video, bytes) and len(pickle.dumps(clip)) < 1024
        assert probe_video(clip.video).num_frames == 9


def test_planning_opens_each_shard_member_once(tmp_path, monkeypatch):
    import fsspec

    from precompute.plan import plan_clips

    write_shards(tmp_path, 6)  # 3 samples in each of two shards
    opened = []
    monkeypatch.setattr(fsspec, "open", lambda url, *args, **kw: opened.append(url) or open_file(url, *args, **kw))
    clips, skipped = plan_clips([load_one(tmp_path, 'webdataset = "shard-000.tar"')], {}, 8)
    assert len(clips) == 3 and not skipped
    assert len(opened) == 1 + 3  # the headers, then each sample once (its caption and video in one read)


@pytest.mark.parametrize("source", ["webdataset", "hf_dataset"])
def test_two_ranks_probe_disjoint_videos_and_plan_every_clip_between_them(tmp_path, monkeypatch, source):
    import precompute.plan as plan

    clips = write_shards(tmp_path, 5)
    if source == "webdataset":
        lines = 'webdataset = "shard-{000..001}.tar"'
    else:
        features = datasets.Features({"video": datasets.Video(), "caption": datasets.Value("string")})
        rows = {"video": [{"bytes": c, "path": f"{i}.mp4"} for i, c in enumerate(clips)],
                "caption": [f"c{i}" for i in range(5)]}
        datasets.Dataset.from_dict(rows, features).save_to_disk(str(tmp_path / "hf"))
        lines = 'hf_dataset = "hf"'
    dataset = load_one(tmp_path, lines)
    probed = []
    monkeypatch.setattr(plan, "probe_video", lambda video: probed.append(video) or probe_video(video))

    whole, _ = plan.plan_clips([dataset], {}, 8)
    probed.clear()
    parts = []
    for rank in range(2):
        parts.append(plan.plan_clips([dataset], {}, 8, rank=rank, world=2)[0])
    assert len(probed) == 5 and len(set(map(repr, probed))) == 5  # each video probed by one rank only
    assert {len(part) for part in parts} == {2, 3}
    assert sorted(c.key for part in parts for c in part) == sorted(c.key for c in whole)


def load_images(tmp_path: Path, source_lines: str) -> DatasetConfig:
    config = tmp_path / "images.toml"
    config.write_text(f"[[datasets]]\n{source_lines}\nresolutions = [[16, 16]]\n")
    return load_dataset_config(str(config), temporal_compression=4).datasets[0]


def test_image_directory_and_jsonl_list_images_with_their_captions(tmp_path):
    from precompute.images import image_size
    from precompute.synthetic import write_captioned_images

    folder = tmp_path / "stills"
    write_captioned_images(folder, [(24, 16), (16, 24)], extension=".jpg")
    write_captioned_images(folder / "nested", [(20, 20)], extension=".webp")
    make_clip(folder / "clip.mp4")  # a video beside them is not an image
    (folder / "clip.txt").write_text("a clip")
    (folder / "nested" / "image_00.txt").unlink()
    items = list(iter_videos(load_images(tmp_path, 'image_directory = "stills"')))
    assert [item.name for item in items] == ["image_00.jpg", "image_01.jpg", "nested/image_00.webp"]
    assert items[0].caption == "a still of shapes, 24x16" and items[0].identity["path"] == items[0].video
    assert items[2].caption is None
    assert "missing caption file image_00.txt beside image_00.webp" in items[2].caption_error
    assert [image_size(item.video) for item in items] == [(24, 16), (16, 24), (20, 20)]
    assert [item.name for item in iter_videos(load_one(tmp_path, 'video_directory = "stills"'))] == ["clip.mp4"]

    lines = [{"image_path": "stills/image_01.jpg", "caption": "portrait"}, {"image_path": "stills/nested/x.png"}]
    (tmp_path / "stills.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(FileNotFoundError, match="line 2: image .*x.png does not exist"):
        list(iter_videos(load_images(tmp_path, 'image_jsonl_file = "stills.jsonl"')))
    (tmp_path / "stills.jsonl").write_text(json.dumps(lines[0]) + '\n{"video_path": "clip.mp4"}\n')
    with pytest.raises(ValueError, match='line 2 has no "image_path" string; each line needs {"image_path", '):
        list(iter_videos(load_images(tmp_path, 'image_jsonl_file = "stills.jsonl"')))
    (tmp_path / "stills.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (item,) = iter_videos(load_images(tmp_path, 'image_jsonl_file = "stills.jsonl"'))
    assert item.video == str(folder / "image_01.jpg") and item.caption == "portrait" and item.dataset == "stills"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="dataset 'empty' holds no images; check its image_directory"):
        list(iter_videos(load_images(tmp_path, 'image_directory = "empty"')))


def test_hf_image_column_and_webdataset_image_members_are_read_by_reference(tmp_path):
    from precompute.images import decode_image, image_size
    from precompute.synthetic import write_image

    write_image(tmp_path / "wide.png", moving_shapes_clip(1, 16, 24)[0])
    data = (tmp_path / "wide.png").read_bytes()
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": data, "path": "wide.png"}], "caption": ["wide"]},
                               features).save_to_disk(str(tmp_path / "hf"))
    with webdataset.TarWriter(str(tmp_path / "images-000.tar")) as writer:
        writer.write({"__key__": "s0", "png": data, "txt": "wide"})
    for lines in ('hf_dataset = "hf"\nimage_column = "image"',
                  'webdataset = "images-000.tar"\nimage_extension = "png"'):
        (item,) = iter_videos(load_images(tmp_path, lines))
        assert not isinstance(item.video, bytes) and read_video(item.video) == data, lines
        assert item.caption == "wide" and set(item.identity) == {"name", "sha256"}
        assert image_size(item.video) == (24, 16) and decode_image(item.video, (24, 16), "none").shape == (1, 16, 24, 3)
    with pytest.raises(ValueError, match=r"sample images-000.tar/s0 has no .jpg member \(it has: png, txt\); set "
                                         "image_extension to the member holding the image"):
        list(iter_videos(load_images(tmp_path, 'webdataset = "images-000.tar"\nimage_extension = "jpg"')))
