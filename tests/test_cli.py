import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from crepa_cli.main import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"], prog_name="crepa")
    assert result.exit_code == 0, result.output
    assert "Usage: crepa" in result.output
    for command in ("precompute", "train", "decode", "cache", "demo"):
        assert command in result.output


def test_bad_input_is_one_clear_message(tmp_path):
    result = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "nowhere")], prog_name="crepa")
    assert result.exit_code != 0
    assert "no cache at" in result.output and "Traceback" not in result.output


LEGACY_PRECOMPUTE_OPTIONS = (
    "--config", "--family", "--model", "--vae", "--text-encoder", "--tokenizer", "--out", "--encoder",
    "--encoder-image-size", "--resize", "--teacher-frames", "--teacher-input", "--teacher-dtype", "--teacher-pool",
    "--no-teacher", "--device", "--vae-dtype", "--encoder-dtype", "--text-encoder-dtype", "--image-encoder-dtype",
    "--latents-dtype", "--text-dtype", "--latent-sampling", "--seed", "--text-max-length", "--encoder-batch-size",
    "--text-batch-size", "--vae-tiling", "--vae-slicing", "--offload", "--decode-workers", "--decode-timeout",
    "--regenerate", "--dry-run", "--strict", "--max-segment-mb", "--segment-clips", "--codec", "--validation-prompts",
)


def test_precompute_help_lists_every_config_field_under_its_old_name():
    import dataclasses

    from precompute.config import PrecomputeConfig, TeacherSettings

    result = CliRunner().invoke(main, ["precompute", "--help"], prog_name="crepa", terminal_width=200)
    assert result.exit_code == 0, result.output
    flags = set(re.findall(r"--[a-z0-9-]+", result.output))
    assert set(LEGACY_PRECOMPUTE_OPTIONS) <= flags
    fields = [f for f in dataclasses.fields(PrecomputeConfig) if f.name != "teacher"]
    assert len(fields) + len(dataclasses.fields(TeacherSettings)) == len(LEGACY_PRECOMPUTE_OPTIONS)
    for option, choices in (("--resize", "aspect|square"), ("--teacher-dtype", "float16|float32|int8"),
                            ("--vae-dtype", "auto|float32|bfloat16|float16"), ("--codec", "zstd|blosc|none"),
                            ("--latent-sampling", "mode|sample")):
        assert re.search(rf"{option} \[{re.escape(choices)}\]", result.output), option
    # field docstrings are the help text
    assert "Average-pool the patch grid by this factor" in result.output


def test_config_validation_and_cli_choices_agree(tmp_path):
    from precompute.config import PrecomputeConfig

    with pytest.raises(ValueError, match=r"--vae-dtype='int4'; use one of auto, float32, bfloat16, float16"):
        PrecomputeConfig(dataset_config="d.toml", family="wan", out=str(tmp_path), vae_dtype="int4")
    result = CliRunner().invoke(main, ["precompute", "--config", "d.toml", "--family", "wan", "--out", "o",
                                       "--vae-dtype", "int4"], prog_name="crepa")
    assert result.exit_code == 2 and "'int4' is not one of 'auto', 'float32', 'bfloat16', 'float16'" in result.output


@pytest.mark.parametrize("stage", ["precompute", "train"])
def test_stage_modules_report_bad_input_in_one_line(tmp_path, stage):
    options = {"precompute": ["--config", str(tmp_path / "missing.toml"), "--family", "wan", "--out",
                              str(tmp_path / "cache"), "--device", "cpu"],
               "train": ["--cache", str(tmp_path / "nowhere"), "--family", "wan", "--model", str(tmp_path),
                         "--output-dir", str(tmp_path / "run")]}[stage]
    done = subprocess.run([sys.executable, "-m", stage, *options], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.startswith("Error: "), done.stderr


def test_options_come_from_the_dataclass_nested_fields_flattened():
    import dataclasses

    import click

    from crepa_cli.options import build_config, config_options

    @dataclasses.dataclass
    class Inner:
        mode: str = dataclasses.field(default="a", metadata={"flag": "inner-mode", "choices": ("a", "b")})
        """How."""

    @dataclasses.dataclass
    class Outer:
        path: str = dataclasses.field(metadata={"flag": "in"})
        """Where from."""
        names: list[str] | None = None
        """Which."""
        inner: Inner = dataclasses.field(default_factory=Inner)
        """Nested."""
        skip: bool = dataclasses.field(default=False, metadata={"flag": "no-thing"})
        """Leave it out."""
        fast: bool = True
        """Go fast."""

    built = []
    command = click.command()(config_options(Outer)(lambda **values: built.append(build_config(Outer, values))))
    result = CliRunner().invoke(command, ["--in", "x", "--names", "p, q", "--inner-mode", "b", "--no-thing",
                                          "--no-fast"])
    assert result.exit_code == 0, result.output
    assert built == [Outer(path="x", names=["p", "q"], inner=Inner(mode="b"), skip=True, fast=False)]
    assert "Missing option '--in'" in CliRunner().invoke(command, []).output
    assert "'c' is not one of 'a', 'b'" in CliRunner().invoke(command, ["--in", "x", "--inner-mode", "c"]).output


def test_train_choices_show_on_the_command_line_and_bind_the_config():
    from train.config import TrainConfig

    result = CliRunner().invoke(main, ["train", "--help"], prog_name="crepa", terminal_width=200)
    for option, choices in (("--optimizer", "adamw|adam|sgd"), ("--base-dtype", "bf16|fp16|fp32|fp8"),
                            ("--crepa-scheduler", "constant|linear|cosine|polynomial"),
                            ("--mixed-precision", "no|bf16|fp16"),
                            ("--timestep-sampling", "uniform|logit_normal|sigmoid|shift"),
                            ("--report-to", "tensorboard|wandb|none")):
        assert re.search(rf"{option} \[{re.escape(choices)}\]", result.output), option
    with pytest.raises(ValueError, match=r"--optimizer='lion'; use one of adamw, adam, sgd"):
        TrainConfig(optimizer="lion")
    flat = " ".join(result.output.split())
    for option in ("--min-timestep FLOAT RANGE", "--max-timestep FLOAT RANGE", "--sigmoid-scale FLOAT RANGE",
                   "--flow-shift FLOAT RANGE", "--save-every, --checkpointing-steps INTEGER RANGE",
                   "--keep-last, --checkpoints-total-limit INTEGER RANGE"):
        assert option in flat, option


def test_config_files_take_the_diffusers_checkpoint_option_names(tmp_path):
    from train.config import read_config_file

    (tmp_path / "run.toml").write_text("checkpointing_steps = 7\ncheckpoints_total_limit = 2\n")
    assert read_config_file(str(tmp_path / "run.toml")) == {"save_every": 7, "keep_last": 2}


def test_a_full_fine_tune_refuses_the_comfyui_lora_export():
    from train.config import TrainConfig

    with pytest.raises(ValueError, match="--comfyui-export writes a LoRA.*drop --comfyui-export or --full"):
        TrainConfig(full=True, base_dtype="fp32", comfyui_export=True)


def test_ranges_show_in_help_and_bind_the_command_line():
    result = CliRunner().invoke(main, ["train", "--help"], prog_name="crepa", terminal_width=200)
    assert re.search(r"--batch-size INTEGER RANGE .*\[default: 1; x>=1\]", result.output), result.output
    assert re.search(r"--learning-rate FLOAT RANGE .*\[default: 0.0001; x>0.0\]", result.output)
    result = CliRunner().invoke(main, ["precompute", "--help"], prog_name="crepa", terminal_width=200)
    assert re.search(r"--encoder-image-size INTEGER RANGE .*x>=14\]", " ".join(result.output.split()))


def _failing_command(error: Exception):
    import click

    from crepa_cli.errors import UserErrorCommand

    @click.command(cls=UserErrorCommand)
    @click.option("--out")
    def command(out):
        raise error

    return command


def test_a_bug_keeps_its_traceback():
    result = CliRunner().invoke(_failing_command(ValueError("shape mismatch in a reshape")), [])
    assert isinstance(result.exception, ValueError) and not isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, how):
    from crepa.errors import UserError

    (tmp_path / "run.toml").write_text("batch_size = 0\n")
    options = ["train", "--config", str(tmp_path / "run.toml")]
    result = CliRunner().invoke(main, ["--debug", *options] if how == "flag" else options,
                                env={"CREPA_DEBUG": "1"} if how == "env" else {}, prog_name="crepa")
    assert isinstance(result.exception, UserError), result.output
    without = CliRunner().invoke(main, options, prog_name="crepa")
    assert without.exit_code == 1 and without.output.startswith("Error: --batch-size=0 is out of range x>=1")


@pytest.mark.parametrize(("code", "expected"), [
    ("ENOENT", "Error: {path} does not exist: check the path"),
    ("EACCES", "Error: permission denied for {path}: change its permissions"),
    ("EROFS", "Error: {path} is on a read-only file system: write somewhere else"),
    ("ENOSPC", "Error: no space left on the device in {path}: "),
])
def test_file_system_errors_name_the_path_and_the_fix(tmp_path, code, expected):
    import errno
    import os

    path = str(tmp_path / "cache" / "segment.zarr")
    error = OSError(getattr(errno, code), os.strerror(getattr(errno, code)), path)
    result = CliRunner().invoke(_failing_command(error), [])
    assert result.exit_code == 1 and result.output.startswith(expected.format(path=path)), result.output
    if code == "ENOSPC":
        assert "GiB are free there; free space or write somewhere else" in result.output


def test_a_full_disk_without_a_file_name_names_the_output_folder(tmp_path):
    import errno

    result = CliRunner().invoke(_failing_command(OSError(errno.ENOSPC, "No space left on device")),
                                ["--out", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: no space left on the device in {tmp_path / 'cache'}: "), result.output


def test_demo_trains_a_sanavideo_lora_that_its_pipeline_loads_and_generates_with(tmp_path):
    import torch
    from diffusers import SanaVideoPipeline
    from safetensors.torch import load_file

    workdir = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--family", "sanavideo", "--workdir", str(workdir)], prog_name="crepa")
    assert result.exit_code == 0, result.output
    assert not (workdir / "run" / "lora_comfyui.safetensors").exists()  # ComfyUI has no SANA-Video model

    pipe = SanaVideoPipeline.from_pretrained(workdir / "models" / "sanavideo")
    pipe.load_lora_weights(workdir / "run")
    saved = load_file(workdir / "run" / "pytorch_lora_weights.safetensors")
    (adapter,) = pipe.transformer.peft_config
    for key, tensor in saved.items():  # transformer.<module>.lora_A.weight: every tensor arrived in its layer
        module, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        layer = getattr(pipe.transformer.get_submodule(module), "lora_" + part.removesuffix(".weight"))
        torch.testing.assert_close(layer[adapter].weight, tensor, rtol=0, atol=0)
    assert len(saved) == 2 * 4 * len(pipe.transformer.transformer_blocks) * 2  # A and B, q k v out, attn1 and attn2
    assert any(tensor.any() for key, tensor in saved.items() if ".lora_B." in key), "the demo trained the LoRA"

    video = pipe(prompt="a red ball moves across", frames=5, height=32, width=64, num_inference_steps=2,
                 use_resolution_binning=False, output_type="np", generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 5, 32, 64, 3) and torch.isfinite(torch.from_numpy(video)).all()


def test_the_kandinsky5_demo_writes_a_lora_its_pipeline_loads_and_generates_with(tmp_path):
    import numpy as np
    import torch
    from diffusers import Kandinsky5T2VPipeline
    from safetensors.torch import load_file

    from train.lora import lora_layers

    result = CliRunner().invoke(main, ["demo", "--family", "kandinsky5_video", "--workdir", str(tmp_path)],
                                prog_name="crepa")
    assert result.exit_code == 0, result.output
    pipe = Kandinsky5T2VPipeline.from_pretrained(str(tmp_path / "models" / "kandinsky5_video"))
    pipe.load_lora_weights(str(tmp_path / "run"))
    saved = load_file(str(tmp_path / "run" / "pytorch_lora_weights.safetensors"))
    loaded = lora_layers(pipe.transformer)
    assert len(saved) == 2 * len(loaded) > 0
    for key, value in saved.items():  # every tensor of the file sits in the layer its name gives
        name, _, part = key.removeprefix("transformer.").partition(".lora_")
        layer = loaded[name].lora_A if part == "A.weight" else loaded[name].lora_B
        (weight,) = [module.weight for module in layer.values()]
        torch.testing.assert_close(weight, value, rtol=0, atol=0)
    frames = pipe(prompt="a red circle moving right", height=48, width=64, num_frames=5, num_inference_steps=2,
                  guidance_scale=1.0, output_type="np").frames
    assert frames.shape == (1, 5, 48, 64, 3) and np.isfinite(frames).all()
