"""Dataset TOML parsing: defaults, path resolution, and error messages that name the file, table, field and fix."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import pytest

from precompute.dataset_config import DatasetConfigError, load_dataset_config, valid_frame_counts_near

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "clips").mkdir(exist_ok=True)
    path = tmp_path / "data.toml"
    path.write_text(text)
    return path


def test_general_defaults_merge_and_relative_paths_resolve_from_the_toml_folder(tmp_path):
    (tmp_path / "list.jsonl").write_text("")
    path = write_config(
        tmp_path,
        """
[general]
resolutions = [[832, 480], [480, 832]]
target_frames = [33, 81]
source_fps = 16

[[datasets]]
video_directory = "clips"
caption_extension = "md"

[[datasets]]
video_jsonl_file = "list.jsonl"
resolution = [624, 624]
frame_extraction = "slide"
frame_stride = 8
num_repeats = 3
""",
    )
    config = load_dataset_config(str(path), temporal_compression=4)
    folder, jsonl = config.datasets
    assert folder.video_directory == str(tmp_path / "clips") and folder.source_kind == "video_directory"
    assert folder.name == "clips" and folder.caption_extension == ".md"
    assert folder.resolutions == [(832, 480), (480, 832)] and folder.target_frames == [33, 81]
    assert folder.source_fps == 16.0 and folder.frame_extraction == "head" and folder.crop == "center"
    assert jsonl.video_jsonl_file == str(tmp_path / "list.jsonl") and jsonl.name == "list"
    assert jsonl.resolutions == [(624, 624)] and jsonl.frame_stride == 8 and jsonl.num_repeats == 3
    assert jsonl.origin == f"{path} [[datasets]] #2"


def test_target_frames_must_match_the_temporal_compression(tmp_path):
    path = write_config(
        tmp_path, '[[datasets]]\nvideo_directory = "clips"\nresolutions = [[64, 48]]\ntarget_frames = [33, 32]\n'
    )
    with pytest.raises(DatasetConfigError) as error:
        load_dataset_config(str(path), temporal_compression=4)
    message = str(error.value)
    assert str(path) in message and "[[datasets]] #1" in message and "target_frames" in message
    assert "4k+1" in message and "29 or 33" in message
    assert valid_frame_counts_near(32, 4) == (29, 33) and valid_frame_counts_near(10, 8) == (9, 17)
    assert load_dataset_config(str(path), temporal_compression=1).datasets[0].target_frames == [33, 32]


def test_unknown_keys_suggest_the_closest_known_one(tmp_path):
    path = write_config(
        tmp_path, '[[datasets]]\nvideo_directory = "clips"\nresolutions = [[64, 48]]\ntarget_frame = [9]\n'
    )
    with pytest.raises(DatasetConfigError, match=r"\[\[datasets\]\] #1: unknown field 'target_frame'.*'target_frames'"):
        load_dataset_config(str(path), 4)
    path.write_text('[general]\ncrop_mode = "center"\n[[datasets]]\nvideo_directory = "clips"\n')
    with pytest.raises(DatasetConfigError, match=r"\[general\]: unknown field 'crop_mode'.*did you mean 'crop'"):
        load_dataset_config(str(path), 4)
    path.write_text('[genral]\n[[datasets]]\nvideo_directory = "clips"\n')
    with pytest.raises(DatasetConfigError, match="unknown top-level key 'genral'.*'general'"):
        load_dataset_config(str(path), 4)
    path.write_text(
        '[[datasets]]\nvideo_directory = "clips"\nresolutions = [[64, 48]]\ntarget_frames = [9]\n'
        'frame_extraction = "heads"\n'
    )
    with pytest.raises(DatasetConfigError, match="frame_extraction is 'heads' \\(did you mean 'head'\\?\\)"):
        load_dataset_config(str(path), 4)


def test_exactly_one_source_per_table(tmp_path):
    (tmp_path / "list.jsonl").write_text("")
    path = write_config(
        tmp_path,
        '[general]\nvideo_directory = "clips"\nresolutions = [[64, 48]]\ntarget_frames = [9]\n'
        '[[datasets]]\nvideo_jsonl_file = "list.jsonl"\n',
    )
    with pytest.raises(
        DatasetConfigError,
        match=r"#1 has 2 sources \(video_directory \(from \[general\]\), "
        r"video_jsonl_file\); set exactly one of",
    ):
        load_dataset_config(str(path), 4)
    path.write_text("[[datasets]]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n")
    with pytest.raises(DatasetConfigError, match="#1 has no source; set exactly one of video_directory"):
        load_dataset_config(str(path), 4)


def test_missing_source_paths_are_named(tmp_path):
    path = write_config(
        tmp_path, '[[datasets]]\nvideo_directory = "nope"\nresolutions = [[64, 48]]\ntarget_frames = [9]\n'
    )
    with pytest.raises(DatasetConfigError, match=f"video_directory folder {tmp_path / 'nope'} does not exist"):
        load_dataset_config(str(path), 4)
    path.write_text('[[datasets]]\nhf_dataset = "./nope"\nresolutions = [[64, 48]]\ntarget_frames = [9]\n')
    with pytest.raises(DatasetConfigError, match="hf_dataset path .* does not exist"):
        load_dataset_config(str(path), 4)
    path.write_text('[[datasets]]\nhf_dataset = "org/videos"\nresolutions = [[64, 48]]\ntarget_frames = [9]\n')
    dataset = load_dataset_config(str(path), 4).datasets[0]
    assert dataset.hf_dataset == "org/videos" and dataset.name == "videos"  # a hub name, left to load_dataset
    with pytest.raises(DatasetConfigError, match="does not exist; check the --config path of `crepa precompute`"):
        load_dataset_config(str(tmp_path / "missing.toml"), 4)


def test_webdataset_patterns_expand_to_existing_shards(tmp_path):
    (tmp_path / "shards").mkdir()
    for index in range(3):
        with tarfile.open(tmp_path / "shards" / f"train-{index:03d}.tar", "w"):
            pass
    path = write_config(
        tmp_path,
        "[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n"
        '[[datasets]]\nwebdataset = "shards/train-{000..001}.tar"\n'
        '[[datasets]]\nname = "all"\nwebdataset = "shards/*.tar"\nvideo_extension = ".MP4"\n',
    )
    braces, globbed = load_dataset_config(str(path), 4).datasets
    assert braces.webdataset == [str(tmp_path / "shards" / f"train-{i:03d}.tar") for i in range(2)]
    assert braces.name == "train"
    assert globbed.webdataset == [str(tmp_path / "shards" / f"train-{i:03d}.tar") for i in range(3)]
    assert globbed.video_extension == "MP4"
    path.write_text(
        '[[datasets]]\nwebdataset = ["shards/train-000.tar", "shards/train-009.tar"]\n'
        "resolutions = [[64, 48]]\ntarget_frames = [9]\n"
    )
    with pytest.raises(DatasetConfigError, match="shard .*train-009.tar does not exist"):
        load_dataset_config(str(path), 4)


def test_value_checks_name_the_field_and_fix(tmp_path):
    base = '[[datasets]]\nvideo_directory = "clips"\n'
    cases = {
        "resolutions = [[64]]\ntarget_frames = [9]": "resolutions entry [64] is not a [width, height] pair",
        "resolutions = [[64, 48]]": "set `target_frames`, e.g. [17]",
        "target_frames = [9]": "set `resolutions",
        "resolutions = [[64, 48]]\nresolution = [64, 48]\ntarget_frames = [9]": "and `resolutions` are both set",
        "resolutions = [[64, 48]]\ntarget_frames = [9]\nmax_frames = 5": "max_frames is 5, below the smallest",
        "resolutions = [[64, 48]]\ntarget_frames = [9]\nframe_stride = 0": "frame_stride is 0; it must be an integer",
        "resolutions = [[64, 48]]\ntarget_frames = [9]\ncrop = 'centre'": "crop is 'centre' (did you mean 'center'",
        "resolutions = [[64, 48]]\ntarget_frames = [9]\nsource_fps = -1": "source_fps is -1; it must be a frame rate",
    }
    for body, expected in cases.items():
        path = write_config(tmp_path, base + body + "\n")
        with pytest.raises(DatasetConfigError, match=re.escape(expected)):
            load_dataset_config(str(path), 4)
    path = write_config(tmp_path, "[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\nnum_repeats = 0\n" + base)
    with pytest.raises(DatasetConfigError, match=r"num_repeats \(set in \[general\]\) is 0"):
        load_dataset_config(str(path), 4)
    path = write_config(tmp_path, "[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n" + base + base)
    with pytest.raises(DatasetConfigError, match="#2: name 'clips' is already used by .*#1; set a distinct `name`"):
        load_dataset_config(str(path), 4)


@pytest.mark.parametrize("example", sorted((REPO / "datasets_cfg").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_for_wan(tmp_path, example):
    """The examples point at /data; retarget each source at a real path and check everything else loads."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "list.jsonl").write_text("")
    (tmp_path / "hf").mkdir()
    with tarfile.open(tmp_path / "train-000000.tar", "w"):
        pass
    stand_ins = {
        "video_directory": '"clips"',
        "video_jsonl_file": '"list.jsonl"',
        "image_directory": '"clips"',
        "image_jsonl_file": '"list.jsonl"',
        "hf_dataset": '"hf"',
        "webdataset": '"train-000000.tar"',
    }
    lines = []
    for line in example.read_text().splitlines():
        key = line.split("=")[0].strip()
        lines.append(f"{key} = {stand_ins[key]}" if key in stand_ins else line)
    copy = tmp_path / example.name
    copy.write_text("\n".join(lines))
    tables = [line for line in lines if line.strip() == "[[datasets]]"]
    config = load_dataset_config(str(copy), temporal_compression=4)
    assert len(config.datasets) == len(tables)
    for dataset in config.datasets:
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in dataset.resolutions)


def test_image_tables_take_one_frame_and_refuse_video_settings(tmp_path):
    (tmp_path / "stills.jsonl").write_text("")
    path = write_config(
        tmp_path,
        '[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\nsource_fps = 16\nframe_extraction = "slide"\n'
        '[[datasets]]\nvideo_directory = "clips"\n'
        '[[datasets]]\nname = "folder"\nimage_directory = "clips"\ncaption_extension = "caption"\n'
        '[[datasets]]\nimage_jsonl_file = "stills.jsonl"\n',
    )
    videos, folder, listed = load_dataset_config(str(path), 4).datasets
    assert not videos.images and videos.target_frames == [9] and videos.source_fps == 16.0
    assert folder.images and folder.medium == "image" and folder.source_kind == "image_directory"
    # [general]'s video settings do not reach the image tables: an image is one frame, whatever the model
    assert folder.target_frames == [1] and folder.source_fps is None and folder.frame_extraction == "head"
    assert folder.caption_extension == ".caption" and folder.image_directory == str(tmp_path / "clips")
    assert listed.images and listed.name == "stills" and listed.image_jsonl_file == str(tmp_path / "stills.jsonl")
    assert load_dataset_config(str(path), 8).datasets[1].target_frames == [1]

    path.write_text('[[datasets]]\nimage_directory = "clips"\nresolutions = [[64, 48]]\n')
    assert load_dataset_config(str(path), 4).datasets[0].target_frames == [1]  # no target_frames needed
    for line in ("target_frames = [9]", "max_frames = 9", 'video_column = "clip"'):
        path.write_text(f'[[datasets]]\nimage_directory = "clips"\nresolutions = [[64, 48]]\n{line}\n')
        field = line.split()[0]
        with pytest.raises(DatasetConfigError, match=rf"#1: {field} applies to videos only, and this table reads "
                                                      r"images \(image_directory\), each a clip of one frame; remove"):
            load_dataset_config(str(path), 4)
    path.write_text('[[datasets]]\nimage_directory = "nope"\nresolutions = [[64, 48]]\n')
    with pytest.raises(DatasetConfigError, match=f"image_directory folder {tmp_path / 'nope'} does not exist"):
        load_dataset_config(str(path), 4)


def test_hf_and_webdataset_tables_read_images_when_their_image_field_is_set(tmp_path):
    (tmp_path / "hf").mkdir()
    with tarfile.open(tmp_path / "images-000.tar", "w"):
        pass
    path = write_config(
        tmp_path,
        "[general]\nresolutions = [[64, 48]]\ntarget_frames = [9]\n"
        '[[datasets]]\nhf_dataset = "hf"\nimage_column = "image"\n'
        '[[datasets]]\nwebdataset = "images-000.tar"\nimage_extension = ".JPG"\n'
        '[[datasets]]\nname = "videos"\nwebdataset = "images-000.tar"\n',
    )
    hf, shards, videos = load_dataset_config(str(path), 4).datasets
    assert hf.images and hf.image_column == "image" and hf.target_frames == [1]
    assert shards.images and shards.image_extension == "JPG" and shards.target_frames == [1]
    assert not videos.images and videos.video_extension == "mp4" and videos.target_frames == [9]
    path.write_text('[[datasets]]\nwebdataset = "images-000.tar"\nimage_extension = "jpg"\nvideo_extension = "mp4"\n'
                    "resolutions = [[64, 48]]\n")
    with pytest.raises(DatasetConfigError, match=r"video_extension applies to videos only, and this table reads "
                                                 r"images \(webdataset with image_extension\)"):
        load_dataset_config(str(path), 4)
