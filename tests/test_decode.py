"""Frame planning, bucketing, segment decoding, and the worker pool's timeout and crash handling."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from precompute.dataset_config import DatasetConfig
from precompute.decode import DecodePool, DecodeTask, decode_segment
from precompute.sampling import VideoInfo, bucket_name, choose_bucket, plan_segments, probe_video
from precompute.synthetic import flat_colour_clip, moving_shapes_clip, write_video

# 27 colours at least 127 apart in some channel, so every frame is recognisable after lossy coding.
PALETTE = [(r, g, b) for r in (0, 128, 255) for g in (0, 128, 255) for b in (0, 128, 255)]
CODEC_TOLERANCE = 8  # max error of a flat frame's mean colour after yuv420p + H.264


def dataset(**overrides) -> DatasetConfig:
    fields = {"name": "d", "resolutions": [(16, 16)], "target_frames": [9], "video_directory": "/x"}
    return DatasetConfig(**{**fields, **overrides})


def starts(plan) -> list[tuple[int, int]]:
    return [(segment.start, segment.num_frames) for segment in plan.segments]


def test_extraction_modes():
    info = VideoInfo(num_frames=30, fps=10.0, width=64, height=48)
    assert starts(plan_segments(info, dataset(target_frames=[9, 17]))) == [(0, 9), (0, 17)]
    assert starts(plan_segments(info, dataset(frame_extraction="chunk"))) == [(0, 9), (9, 9), (18, 9)]
    slide = plan_segments(info, dataset(frame_extraction="slide", frame_stride=10))
    assert starts(slide) == [(0, 9), (10, 9), (20, 9)]
    assert slide.segments[1].frame_indices == tuple(range(10, 19)) and slide.segments[1].fps == 10.0
    assert starts(plan_segments(info, dataset(frame_extraction="uniform", frame_sample=3))) == [
        (0, 9),
        (10, 9),
        (21, 9),
    ]
    # 25 windows asked of a video with 22 possible starts: duplicates are dropped, not cached twice.
    assert len(plan_segments(info, dataset(frame_extraction="uniform", frame_sample=25)).segments) == 22
    capped = plan_segments(info, dataset(frame_extraction="chunk", max_frames=20))
    assert starts(capped) == [(0, 9), (9, 9)]


def test_source_fps_resamples_by_time_before_extraction():
    info = VideoInfo(num_frames=30, fps=30.0, width=64, height=48)  # one second
    down = plan_segments(info, dataset(source_fps=10.0, frame_extraction="chunk"))
    assert starts(down) == [(0, 9)]  # 10 frames at 10 fps
    assert down.segments[0].frame_indices == (0, 3, 6, 9, 12, 15, 18, 21, 24) and down.segments[0].fps == 10.0
    up = plan_segments(VideoInfo(6, 6.0, 64, 48), dataset(source_fps=9.0))  # 6 frames -> 9 ticks
    assert up.segments[0].frame_indices == (0, 1, 1, 2, 3, 3, 4, 5, 5)


def test_too_short_video_gives_a_reason():
    plan = plan_segments(VideoInfo(20, 30.0, 64, 48), dataset(source_fps=10.0))
    assert (
        plan.segments == []
        and plan.reason == "too short: 7 frames at 10 fps, fewer than the smallest target_frames (9)"
    )


def test_bucket_choice_by_aspect_then_area():
    buckets = [(832, 480), (480, 832), (624, 624)]
    assert choose_bucket(1920, 1080, buckets) == (832, 480)
    assert choose_bucket(720, 1280, buckets) == (480, 832)
    assert choose_bucket(500, 520, buckets) == (624, 624)
    same_aspect = [(1248, 720), (832, 480)]
    assert choose_bucket(860, 496, same_aspect) == (832, 480) and choose_bucket(1920, 1108, same_aspect) == (1248, 720)
    assert bucket_name(81, 480, 832) == "f81_h480_w832"


def test_probe_counts_frames_with_and_without_container_metadata(tmp_path):
    write_video(tmp_path / "a.mp4", moving_shapes_clip(12, 32, 48, seed=0), fps=12)
    write_video(tmp_path / "a.mkv", moving_shapes_clip(12, 32, 48, seed=0), fps=12)  # Matroska stores no count
    assert probe_video(str(tmp_path / "a.mp4")) == VideoInfo(12, 12.0, 48, 32)
    assert probe_video(str(tmp_path / "a.mkv")) == VideoInfo(12, 12.0, 48, 32)
    assert probe_video((tmp_path / "a.mp4").read_bytes()) == VideoInfo(12, 12.0, 48, 32)


@pytest.fixture(scope="module")
def palette_video(tmp_path_factory) -> str:
    """27 flat frames, a keyframe every 4 so late windows are reached by seeking."""
    path = tmp_path_factory.mktemp("video") / "palette.mp4"
    write_video(path, flat_colour_clip(PALETTE, 32, 48), fps=10, keyframe_interval=4)
    return str(path)


def mean_colours(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1, 3).mean(axis=1)


def test_decode_returns_the_requested_frames_in_order(palette_video):
    indices = (13, 14, 14, 20, 26, 2)
    frames = decode_segment(palette_video, indices, (24, 16), "center")
    assert frames.shape == (6, 16, 24, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(mean_colours(frames), [PALETTE[i] for i in indices], atol=CODEC_TOLERANCE)
    with open(palette_video, "rb") as file:
        from_bytes = decode_segment(file.read(), indices, (24, 16), "center")
    np.testing.assert_array_equal(from_bytes, frames)


def test_center_crop_keeps_the_middle_and_none_squashes(tmp_path):
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :16] = (255, 0, 0)  # red left quarter
    frame[:, 16:48] = (0, 255, 0)  # green middle half
    frame[:, 48:] = (0, 0, 255)  # blue right quarter
    write_video(tmp_path / "bands.mp4", np.stack([frame] * 2), fps=4)
    centre = decode_segment(str(tmp_path / "bands.mp4"), (0,), (16, 16), "center")[0]
    squashed = decode_segment(str(tmp_path / "bands.mp4"), (0,), (16, 16), "none")[0]
    np.testing.assert_allclose(centre[:, 2:14].reshape(-1, 3).mean(0), (0, 255, 0), atol=CODEC_TOLERANCE)
    np.testing.assert_allclose(squashed[:, :3].reshape(-1, 3).mean(0), (255, 0, 0), atol=2 * CODEC_TOLERANCE)
    np.testing.assert_allclose(squashed[:, -3:].reshape(-1, 3).mean(0), (0, 0, 255), atol=2 * CODEC_TOLERANCE)


def test_inline_pool_reports_corrupt_and_short_videos(tmp_path, palette_video):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    tasks = [
        DecodeTask("good", palette_video, (0, 1), (16, 16)),
        DecodeTask("corrupt", str(corrupt), (0,), (16, 16)),
        DecodeTask("short", palette_video, (25, 26, 27), (16, 16)),
    ]
    with DecodePool(num_workers=0) as pool:
        good, bad, short = pool.map(tasks)
    assert good.ok and good.frames.shape == (2, 16, 16, 3)
    assert not bad.ok and bad.frames is None and "Invalid data found" in bad.error and "corrupt.mp4" in bad.error
    assert not short.ok and "the video ended before frame 27 (2 of 3 frames decoded)" in short.error


def no_new_children(before: set) -> bool:
    """Every process the pool started is gone (other tests' processes, e.g. loader workers, may still run)."""
    return set(multiprocessing.active_children()) <= before


def test_two_workers_return_every_result(tmp_path, palette_video):
    before = set(multiprocessing.active_children())
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00" * 1000)
    tasks = [DecodeTask(i, palette_video, (i, i + 1, i + 2), (24, 16)) for i in range(8)]
    tasks.append(DecodeTask("corrupt", str(corrupt), (0,), (16, 16)))
    with DecodePool(num_workers=2, timeout_s=30) as pool:
        results = {result.task_id: result for result in pool.map(tasks)}
    assert set(results) == {*range(8), "corrupt"} and not results["corrupt"].ok
    for task in tasks[:-1]:
        np.testing.assert_array_equal(results[task.task_id].frames, task.run())
    assert no_new_children(before)


@dataclass(frozen=True)
class HangingTask(DecodeTask):
    """Writes its worker's pid, then hangs like a decoder stuck on a broken file."""

    pid_file: str = ""

    def run(self) -> np.ndarray:
        Path(self.pid_file).write_text(str(os.getpid()))
        time.sleep(60)
        raise AssertionError("the pool should have killed this worker")


@dataclass(frozen=True)
class CrashingTask(DecodeTask):
    """Dies like a decoder hitting a segfault."""

    def run(self) -> np.ndarray:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class MarkingTask(DecodeTask):
    """Leaves a file behind when a worker runs it."""

    mark: str = ""

    def run(self) -> np.ndarray:
        Path(self.mark).write_text("decoded")
        return super().run()


def test_map_starts_decoding_before_its_first_result_is_asked_for(tmp_path, palette_video):
    before = set(multiprocessing.active_children())
    mark = tmp_path / "mark"
    with DecodePool(num_workers=1, timeout_s=30) as pool:
        results = pool.map([MarkingTask("a", palette_video, (0,), (16, 16), mark=str(mark))])
        deadline = time.monotonic() + 30
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mark.exists(), "the worker should decode while the caller does other work"
        (result,) = results
        assert result.ok
    assert no_new_children(before)


def test_a_hanging_task_is_killed_and_a_crash_is_reported(tmp_path, palette_video):
    before = set(multiprocessing.active_children())
    pid_file = tmp_path / "pid"
    tasks = [
        HangingTask("hang", palette_video, (0,), (16, 16), pid_file=str(pid_file)),
        CrashingTask("crash", palette_video, (0,), (16, 16)),
        *(DecodeTask(i, palette_video, (i,), (16, 16)) for i in range(4)),
    ]
    start = time.monotonic()
    with DecodePool(num_workers=1, timeout_s=1.0) as pool:
        results = {result.task_id: result for result in pool.map(tasks)}
        assert time.monotonic() - start < 50  # the hanging task sleeps 60 s: less proves it was killed
        assert results["hang"].error.startswith("timed out after 1 s")
        assert "died from signal SIGKILL" in results["crash"].error
        assert all(results[i].ok for i in range(4))
        with pytest.raises(ProcessLookupError):  # killed and reaped: not even a zombie is left
            os.kill(int(pid_file.read_text()), 0)
        # Leaving a map early stops the worker that is still busy; the pool stays usable.
        for _ in pool.map([HangingTask("again", palette_video, (0,), (16, 16), pid_file=str(pid_file))] * 3):
            break
        (again,) = pool.map([DecodeTask("after", palette_video, (3,), (16, 16))])
        assert again.ok
    assert no_new_children(before)
