"""Bad input on the command line: one `Error: ...` line (or click's usage error), and nothing written.

Each row is the arguments of one command, an optional config file's text, the expected first words of the
message and the exit status. `{cache}`, `{model}`, `{encoder}`, `{dataset}`, `{config}` and `{out}` are filled in
per test; `{out}` (the --out / --output-dir folder) must not exist afterwards.
"""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from conftest import write_dataset

from crepa_cli.main import main

TRAIN = ["train", "--cache", "{cache}", "--model", "{model}", "--output-dir", "{out}", "--family", "wan",
         "--max-train-steps", "1", "--dataloader-num-workers", "0", "--report-to", "none", "--crepa-block-index", "1"]
TRAIN_WITH_FILE = [*TRAIN, "--config", "{config}"]
PRECOMPUTE = ["precompute", "--config", "{dataset}", "--family", "wan", "--out", "{out}", "--model", "{model}",
              "--encoder", "{encoder}", "--encoder-image-size", "56", "--device", "cpu", "--decode-workers", "0"]

ROWS = {
    # name: (arguments, config file text or None, expected first words after "Error: ", exit status)
    "wrong-type config field": (TRAIN_WITH_FILE, 'batch_size = "two"\n',
                                "batch_size must be an integer, got 'two' in {config}", 1),
    "negative learning rate in a config": (TRAIN_WITH_FILE, "learning_rate = -1e-4\n",
                                           "--learning-rate=-0.0001 is out of range x>0.0 in {config}", 1),
    "negative learning rate": ([*TRAIN, "--learning-rate", "-1e-4"], None,
                               "Invalid value for '--learning-rate': -0.0001 is not in the range x>0.0", 2),
    "learning rate nan": ([*TRAIN, "--learning-rate", "nan"], None,
                          "--learning-rate must be a finite number, got nan", 1),
    "learning rate inf in a config": (TRAIN_WITH_FILE, "learning_rate = inf\n",
                                      "--learning-rate must be a finite number, got inf in {config}", 1),
    "batch size 0": ([*TRAIN, "--batch-size", "0"], None,
                     "Invalid value for '--batch-size': 0 is not in the range x>=1", 2),
    "batch size 0 in a config": (TRAIN_WITH_FILE, "batch_size = 0\n", "--batch-size=0 is out of range x>=1", 1),
    "float for an integer in a config": (TRAIN_WITH_FILE, "lora_rank = 4.5\n",
                                         "lora_rank must be an integer, got 4.5 in {config}", 1),
    "numbers for a list in a config": (TRAIN_WITH_FILE, "lora_target_modules = [1, 2]\n",
                                      "lora_target_modules must be a list of strings, got [1, 2] in {config}", 1),
    "string for a switch in a config": (TRAIN_WITH_FILE, 'full = "yes"\n',
                                        "full must be true or false, got 'yes' in {config}", 1),
    "choice not offered in a config": (TRAIN_WITH_FILE, 'optimizer = "lion"\n',
                                       "--optimizer='lion'; use one of adamw, adam, sgd in {config}", 1),
    "toml syntax error": (TRAIN_WITH_FILE, "seed = 1\nbatch_size = \n",
                          "Invalid value (at line 2, column 14) in {config}", 1),
    "unknown option in a config": (TRAIN_WITH_FILE, "bach_size = 2\n",
                                   "{config}: unknown option(s) bach_size (did you mean batch_size?)", 1),
    "missing config file": ([*TRAIN, "--config", "{out}.toml"], None, "--config {out}.toml does not exist", 1),
    "nonexistent cache": (["train", "--cache", "{out}-cache", "--model", "{model}", "--output-dir", "{out}"], None,
                          "no cache at {out}-cache", 1),
    "nonexistent model": (["train", "--cache", "{cache}", "--model", "{out}-model", "--output-dir", "{out}"], None,
                          "could not load the transformer from '{out}-model/transformer'", 1),
    "full fine-tune with bf16 base weights": ([*TRAIN, "--full", "--base-dtype", "bf16"], None,
                                              "--full trains the base weights, which need fp32 master copies", 1),
    "block index out of range": ([*TRAIN, "--crepa-block-index", "99"], None,
                                 "crepa_block_index=99 is out of range: the wan transformer has 3 blocks, "
                                 "valid indices are 0..2", 1),
    "negative block index": ([*TRAIN, "--crepa-block-index", "-1"], None,
                             "Invalid value for '--crepa-block-index': -1 is not in the range x>=0", 2),
    "backbone mode without a teacher block": ([*TRAIN, "--crepa-use-backbone-features"], None,
                                              "--crepa-use-backbone-features needs --crepa-teacher-block-index", 1),
    "decaying lambda without decay steps": ([*TRAIN, "--crepa-scheduler", "linear"], None,
                                            "crepa_scheduler=linear needs crepa_decay_steps > crepa_warmup_steps", 1),
    "timestep range upside down": ([*TRAIN, "--min-timestep", "600", "--max-timestep", "200"], None,
                                   "--min-timestep 600 must be below --max-timestep 200: both are on the 0..1000 "
                                   "timestep scale", 1),
    "timestep above the scale": ([*TRAIN, "--max-timestep", "1200"], None,
                                 "Invalid value for '--max-timestep': 1200.0 is not in the range 0.0<=x<=1000.0", 2),
    "unknown family for train": ([*TRAIN, "--family", "hunyuan"], None,
                                 "unsupported model family 'hunyuan'; supported families: wan", 1),
    "unknown family for precompute": ([*PRECOMPUTE, "--family", "hunyuan"], None,
                                      "unsupported model family 'hunyuan'; supported families: wan", 1),
    "dataset toml syntax error": ([*PRECOMPUTE, "--config", "{config}"], "[general]\nresolutions = [[64, 48]\n",
                                  "{config} is not valid TOML: ", 1),
    "missing dataset config": ([*PRECOMPUTE, "--config", "{out}.toml"], None,
                               "dataset config {out}.toml does not exist", 1),
    "nonexistent model for precompute": ([*PRECOMPUTE, "--model", "{out}-model"], None,
                                         "could not read the vae config from '{out}-model/vae'", 1),
    "decode timeout nan": ([*PRECOMPUTE, "--decode-timeout", "nan"], None,
                           "--decode-timeout must be a finite number, got nan", 1),
    "encoder image size below one patch": ([*PRECOMPUTE, "--encoder-image-size", "10"], None,
                                           "Invalid value for '--encoder-image-size': 10 is not in the range x>=14",
                                           2),
    "dry run": ([*PRECOMPUTE, "--dry-run"], None, None, 0),
    "missing cache for info": (["cache", "info", "{out}"], None, "no cache at {out}", 1),
    "missing cache for export": (["cache", "export", "{out}-cache", "{out}"], None, "no cache at {out}-cache", 1),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_and_creates_nothing(name, tmp_path, tiny_models, trained_cache):
    arguments, config_text, expected, status = ROWS[name]
    places = {"cache": trained_cache, "model": tiny_models["wan"], "encoder": tiny_models["dinov2"],
              "dataset": write_dataset(tmp_path) if arguments[0] == "precompute" else "",
              "config": str(tmp_path / "run.toml"), "out": str(tmp_path / "out")}
    if config_text is not None:
        (tmp_path / "run.toml").write_text(config_text)
    result = CliRunner().invoke(main, [a.format(**places) for a in arguments], prog_name="crepa")

    assert result.exit_code == status, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    if status == 1:
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, result.output
        assert errors[0].startswith(f"Error: {expected.format(**places)}"), errors[0]
    elif status == 2:
        assert expected.format(**places) in " ".join(result.output.split()), result.output
    assert not os.path.exists(places["out"]), f"{name} created {places['out']}"

