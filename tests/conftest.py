"""Tiny random-weight models and real mp4 clips shared by the end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """family -> the folder of its tiny pipeline, built once a session on first use."""
    from crepa.families import get_family
    from crepa.tiny_models import save_tiny_pipeline

    folders: dict[str, str] = {}

    def folder(family: str) -> str:
        if family not in folders:
            folders[family] = save_tiny_pipeline(get_family(family), str(tmp_path_factory.mktemp(f"{family}_pipeline")))
        return folders[family]

    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_pipelines) -> dict[str, str]:
    """The Wan pipeline folder and two DINOv2 encoders (plain and with registers), saved with save_pretrained."""
    from crepa.tiny_models import save_tiny_dinov2

    root = tmp_path_factory.mktemp("models")
    return {
        "wan": tiny_pipelines("wan"),
        "dinov2": save_tiny_dinov2(str(root / "dinov2")),
        "dinov2_reg": save_tiny_dinov2(str(root / "dinov2_reg"), registers=4, seed=1),
    }


def write_dataset(folder: Path, clips: int = 3, frames: int = 17, config_extra: str = "", family: str = "wan",
                  resolution: tuple[int, int] | None = None) -> str:
    """`clips` moving-shape videos of `frames` frames with captions in folder/clips and a dataset TOML of one bucket,
    sized for the family's tiny models (Wan: 9 frames of 64x48) unless `resolution` (width, height) is given;
    returns its path."""
    from crepa.families import get_family
    from crepa.tiny_models import tiny_clip_size
    from precompute.synthetic import write_captioned_clips

    target, width, height = tiny_clip_size(get_family(family))
    width, height = resolution or (width, height)
    write_captioned_clips(folder / "clips", count=clips, frames=frames)
    config = folder / "dataset.toml"
    config.write_text(
        f"[general]\nresolutions = [[{width}, {height}]]\ntarget_frames = [{target}]\nframe_extraction = \"head\"\n"
        f"{config_extra}\n[[datasets]]\nname = \"t\"\nvideo_directory = \"clips\"\n"
    )
    return str(config)


@pytest.fixture
def dataset(tmp_path) -> str:
    return write_dataset(tmp_path)


@pytest.fixture(scope="session")
def trained_cache(tmp_path_factory, tiny_models) -> str:
    """A finished cache of 3 clips (one bucket), shared read-only by training tests."""
    from precompute.config import PrecomputeConfig, TeacherSettings
    from precompute.pipeline import run_precompute

    root = tmp_path_factory.mktemp("cache")
    config = PrecomputeConfig(dataset_config=write_dataset(root), family="wan", out=str(root / "cache"),
                              model=tiny_models["wan"], device="cpu", decode_workers=0,
                              teacher=TeacherSettings(encoder=tiny_models["dinov2"], image_size=56))
    run_precompute(config)
    return str(root / "cache")


@pytest.fixture(scope="module")
def wan():
    """(adapter, a tiny random WanTransformer3DModel in eval mode), seeded."""
    import torch

    from crepa.families import get_family

    adapter = get_family("wan")
    torch.manual_seed(0)
    return adapter, adapter.transformer_class()(**adapter.tiny_transformer_config()).eval()
