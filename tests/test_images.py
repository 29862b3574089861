"""Images beside videos: decoded upright in RGB, cached as clips of one frame in the bucket of their aspect ratio,
and trained on in batches of their own."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image, ImageOps
from test_train import train_config

from crepa.cache.store import CacheStore
from crepa.cache.view import CacheView
from precompute.config import PrecomputeConfig, TeacherSettings
from precompute.images import decode_image, image_size
from precompute.pipeline import run_precompute
from precompute.report import print_summary
from precompute.synthetic import moving_shapes_clip, write_captioned_clips, write_captioned_images, write_image
from train.data import BucketBatchSampler
from train.trainer import run_train


@pytest.mark.parametrize("extension", [".jpg", ".png", ".webp"])
def test_every_exif_orientation_stands_upright_as_pil_turns_it(tmp_path, extension):
    pixels = moving_shapes_clip(1, 30, 50, seed=3)[0]
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}{extension}"
        write_image(path, pixels, orientation=orientation)
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
        assert image_size(str(path)) == upright.size, orientation
        decoded = decode_image(str(path), upright.size, "none")  # same size: the resize only copies
        assert decoded.shape == (1, upright.height, upright.width, 3) and decoded.dtype == np.uint8
        assert np.array_equal(decoded[0], np.asarray(upright)), orientation


def test_every_mode_becomes_rgb_with_transparency_over_white(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (200, 30, 40, 255)  # opaque red left half, fully transparent (black underneath) right half
    write_image(tmp_path / "rgba.png", rgba)
    decoded = decode_image(str(tmp_path / "rgba.png"), (16, 16), "none")[0]
    assert (decoded[:, :8] == (200, 30, 40)).all() and (decoded[:, 8:] == 255).all()

    Image.fromarray(rgba).convert("LA").save(tmp_path / "la.png")
    assert (decode_image(str(tmp_path / "la.png"), (16, 16), "none")[0][:, 8:] == 255).all()
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgba[..., :3]).convert("L").save(tmp_path / "l.jpg")
    Image.fromarray(rgba[..., :3]).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ("p.png", "l.jpg", "cmyk.jpg"):
        with Image.open(tmp_path / name) as image:
            expected = np.asarray(image.convert("RGB"))
        assert np.array_equal(decode_image(str(tmp_path / name), (16, 16), "none")[0], expected), name


def test_an_image_is_cropped_to_its_bucket_as_a_video_frame_is(tmp_path):
    from precompute.decode import decode_segment
    from precompute.synthetic import write_video

    frame = moving_shapes_clip(1, 48, 80, seed=1)[0]
    write_image(tmp_path / "frame.png", frame)
    write_video(tmp_path / "frame.mp4", frame[None].repeat(2, axis=0), fps=8)
    image = decode_image(str(tmp_path / "frame.png"), (48, 48), "center")[0]
    video = decode_segment(str(tmp_path / "frame.mp4"), (0,), (48, 48), "center")[0]
    assert image.shape == video.shape == (48, 48, 3)
    # the same centre crop and resize; the video's only difference is its lossy codec
    assert np.abs(image.astype(int) - video.astype(int)).mean() < 8


def write_mixed_dataset(root: Path) -> str:
    """Two 64x48 videos and five images of other shapes (one stored sideways with an EXIF turn) in two tables."""
    write_captioned_clips(root / "clips", count=2, frames=17)
    stills = root / "stills"
    write_captioned_images(stills, [(80, 60), (96, 72), (40, 60), (50, 52)])
    # stored 60 wide and 40 high; EXIF orientation 6 says to turn it a quarter clockwise: upright it is 40x60
    write_image(stills / "sideways.jpg", moving_shapes_clip(1, 40, 60, seed=7)[0], orientation=6)
    (stills / "sideways.txt").write_text("a photo stored sideways")
    config = root / "dataset.toml"
    config.write_text(
        '[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\nframe_extraction = "head"\n\n'
        '[[datasets]]\nname = "clips"\nvideo_directory = "clips"\n\n'
        '[[datasets]]\nname = "stills"\nimage_directory = "stills"\nresolutions = [[64, 48], [48, 64], [48, 48]]\n'
    )
    return str(config)


EXPECTED_GROUPS = {
    "clips/clip_00.mp4": "f9_h48_w64", "clips/clip_01.mp4": "f9_h48_w64",
    "stills/image_00.png": "f1_h48_w64",  # 80x60 is 4:3
    "stills/image_01.png": "f1_h48_w64",  # 96x72 is 4:3
    "stills/image_02.png": "f1_h64_w48",  # 40x60 (2:3) is nearest 3:4
    "stills/image_03.png": "f1_h48_w48",  # 50x52 is nearest 1:1
    "stills/sideways.jpg": "f1_h64_w48",  # upright 40x60; its stored 60x40 would be 4:3
}


def precompute_config(dataset: str, out: str, models: dict, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(dataset_config=dataset, family="wan", out=out, model=models["wan"], device="cpu",
                            decode_workers=kw.pop("decode_workers", 0),
                            teacher=TeacherSettings(encoder=models["dinov2"], image_size=56), **kw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_models) -> tuple[str, str]:
    """(dataset config, cache) of the mixed dataset, precomputed with one decode worker."""
    root = tmp_path_factory.mktemp("mixed")
    dataset = write_mixed_dataset(root)
    out = str(root / "cache")
    summary = run_precompute(precompute_config(dataset, out, tiny_models, decode_workers=1))
    assert summary.planned == 7 and summary.planned_images == 5 and not summary.skipped
    assert summary.computed == {"latents": 7, "teacher": 7, "text": 8}  # the captions and the empty prompt
    return dataset, out


def test_the_dry_run_counts_images_and_their_bytes(tmp_path, mixed, tiny_models, capsys):
    dataset, _ = mixed
    config = precompute_config(dataset, str(tmp_path / "new"), tiny_models, dry_run=True)
    summary = run_precompute(config)
    assert (summary.planned, summary.planned_images) == (7, 5)
    # float32 latents of 4 channels, (h/8 x w/8) each: 3 latent frames per video, 1 per image
    assert summary.estimated_bytes["latents"] == 4 * 4 * (2 * 3 * 6 * 8 + 4 * 6 * 8 + 6 * 6)
    print_summary(config, summary)
    assert "dry run: 7 clips planned (5 of them images)" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "new")


def test_images_are_cached_as_one_frame_clips_in_the_bucket_of_their_aspect(mixed):
    _, out = mixed
    (plan_file,) = (Path(out) / "plans").glob("*.json")
    plan = json.loads(plan_file.read_text())
    groups = {f"{clip['dataset']}/{clip['source']}": clip["group"] for clip in plan["clips"]}
    assert groups == EXPECTED_GROUPS
    images = {clip["key"] for clip in plan["clips"] if clip["image"]}
    assert len(images) == 5 and all(clip["fps"] is None for clip in plan["clips"] if clip["image"])

    # plain zarr: every entry of a one-frame bucket holds one latent frame and one teacher frame
    root = zarr.open_group(out, mode="r")
    frames_by_group: dict[str, set[tuple[int, int]]] = {}
    for kind, array_name, frame_axis in (("latents", "latents", 2), ("teacher", "patch", 1)):
        for _, feature_set in root[kind].groups():
            for group, segments in feature_set.groups():
                for _, segment in segments.groups():
                    frames = segment[array_name].shape[frame_axis]
                    frames_by_group.setdefault(group, set()).add((kind == "teacher", frames))
    assert frames_by_group == {
        "f9_h48_w64": {(False, 3), (True, 3)},
        "f1_h48_w64": {(False, 1), (True, 1)},
        "f1_h64_w48": {(False, 1), (True, 1)},
        "f1_h48_w48": {(False, 1), (True, 1)},
    }
    view = CacheView(CacheStore.open(out), "wan")
    portrait = view.load(next(clip for clip in view.clips if clip.source == "sideways.jpg"))
    # 48x64 pixels / 8 -> 8x6 latents; aspect resize of 64x48 to ~56^2 pixels: 70x42 -> 5x3 patches
    assert portrait["latents"].shape == (4, 1, 8, 6) and portrait["teacher"].shape == (1, 5, 3, 32)
    assert portrait["fps"] is None


def test_a_rerun_reuses_every_clip_and_a_changed_image_is_recomputed(tmp_path, tiny_models):
    write_captioned_images(tmp_path / "stills", [(64, 48), (48, 64)])
    dataset = tmp_path / "dataset.toml"
    dataset.write_text('[[datasets]]\nimage_directory = "stills"\nresolutions = [[64, 48], [48, 64]]\n')
    out = str(tmp_path / "cache")
    run_precompute(precompute_config(str(dataset), out, tiny_models))
    again = run_precompute(precompute_config(str(dataset), out, tiny_models))
    assert again.computed == {"latents": 0, "teacher": 0, "text": 0}
    assert again.reused == {"latents": 2, "teacher": 2, "text": 3}  # the captions and the empty prompt

    write_image(tmp_path / "stills" / "image_01.png", moving_shapes_clip(1, 64, 48, seed=9)[0])
    changed = run_precompute(precompute_config(str(dataset), out, tiny_models))
    assert changed.computed == {"latents": 1, "teacher": 1, "text": 0}
    assert len(CacheView(CacheStore.open(out), "wan").clips) == 2


def test_batches_never_mix_one_frame_and_multi_frame_clips(mixed):
    _, out = mixed
    clips = CacheView(CacheStore.open(out), "wan").clips
    groups = [clip.group for clip in clips]
    sampler = BucketBatchSampler(groups, [1] * len(clips), batch_size=2, seed=0)
    batches = [[groups[index] for index in batch] for epoch in range(4) for batch in sampler.epoch_batches(epoch)]
    assert all(len(set(batch)) == 1 for batch in batches)
    assert {batch[0] for batch in batches} == {"f9_h48_w64", "f1_h48_w64", "f1_h64_w48"}  # f1_h48_w48 holds one


def test_the_trainer_trains_on_images_and_videos_of_one_cache(tmp_path, mixed, tiny_models, monkeypatch):
    import train.trainer
    from crepa.loss import crepa_scores

    frames = []

    def observed(student, teacher, **kwargs):
        frames.append((student.shape[:2], teacher.shape[:2]))
        return crepa_scores(student, teacher, **kwargs)

    monkeypatch.setattr(train.trainer, "crepa_scores", observed)
    _, out = mixed
    result = run_train(train_config(out, tiny_models, str(tmp_path / "run"), batch_size=2, max_train_steps=3))
    assert result.steps == 3
    # one epoch holds three batches of two: the videos (3 latent frames), and two buckets of images (1 frame)
    assert sorted(frames) == sorted([(torch.Size([2, 1]),) * 2] * 2 + [(torch.Size([2, 3]),) * 2])
