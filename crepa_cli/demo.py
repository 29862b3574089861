"""`crepa demo`: the whole product on tiny local models and generated clips, in about a minute on a CPU."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "datasets_cfg" / "demo.toml"


def prepare_demo(workdir: str, family: str = "wan") -> dict[str, str]:
    """Models, clips and the dataset config under `workdir`; returns their paths."""
    from crepa.families import get_family
    from crepa.tiny_models import save_tiny_dinov2, save_tiny_pipeline
    from precompute.synthetic import write_captioned_clips

    root = Path(workdir)
    paths = {"pipeline": str(root / "models" / family), "encoder": str(root / "models" / "dinov2"),
             "clips": str(root / "clips"), "config": str(root / "dataset.toml"), "cache": str(root / "cache"),
             "run": str(root / "run")}
    if not os.path.exists(os.path.join(paths["pipeline"], "model_index.json")):
        save_tiny_pipeline(get_family(family), paths["pipeline"])
    if not os.path.exists(os.path.join(paths["encoder"], "config.json")):
        save_tiny_dinov2(paths["encoder"])
    if not os.path.isdir(paths["clips"]):
        write_captioned_clips(Path(paths["clips"]))
    Path(paths["config"]).write_text(demo_dataset_config(family))
    return paths


def demo_dataset_config(family: str) -> str:
    """datasets_cfg/demo.toml with the one bucket the family's tiny models take, from the family's frame and side
    rules (Wan: 9 frames of 64x48; LTX-Video: 17 frames of 128x96)."""
    from crepa.families import get_family
    from crepa.tiny_models import tiny_clip_size

    frames, width, height = tiny_clip_size(get_family(family))
    text = DEMO_CONFIG.read_text()
    for key, value in (("resolutions", f"[[{width}, {height}]]"), ("target_frames", f"[{frames}]")):
        text, count = re.subn(rf"^{key} = \[[^#\n]*\]", f"{key} = {value}", text, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"{DEMO_CONFIG} has {count} `{key} = [...]` lines, expected one")
    return text


def run_demo(workdir: str, family: str = "wan") -> None:
    """Build the tiny world, precompute its cache, then train a LoRA on it."""
    from precompute.config import PrecomputeConfig, TeacherSettings
    from precompute.pipeline import run_precompute
    from precompute.report import print_summary

    paths = prepare_demo(workdir, family)
    click.echo(f"tiny models in {os.path.dirname(paths['pipeline'])}, clips in {paths['clips']}")
    config = PrecomputeConfig(
        dataset_config=paths["config"], family=family, out=paths["cache"], model=paths["pipeline"],
        teacher=TeacherSettings(encoder=paths["encoder"], image_size=56), device="cpu", decode_workers=1,
    )
    print_summary(config, run_precompute(config))
    click.echo(f"cache: {paths['cache']} (inspect with `crepa cache info {paths['cache']}`)")

    from crepa.families import get_family
    from train.config import TrainConfig
    from train.trainer import run_train

    result = run_train(TrainConfig(
        cache=paths["cache"], family=family, model=paths["pipeline"], output_dir=paths["run"], crepa_block_index=1,
        crepa_lambda=0.5, learning_rate=1e-3, max_train_steps=20, save_every=10, lora_rank=8,
        dataloader_num_workers=1, comfyui_export=get_family(family).comfyui_lora,
    ))
    click.echo(f"LoRA (diffusers format): {result.lora_path}")
    click.echo(f"CREPA projector: {result.projector_path}")
    click.echo(f"training curves: {result.plot_path}")
    click.echo(f"after the first batch, the trainer waited on the loader {100 * result.data_wait_fraction:.1f}% "
               "of the time")
