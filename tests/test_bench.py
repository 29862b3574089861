"""The benchmark scripts still run (tiny sizes, nothing recorded); their figures live in bench/RESULTS.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> str:
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    done = subprocess.run([sys.executable, "-m", *args, "--no-record"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (results.read_bytes() if results.exists() else None) == before
    return done.stdout


def test_loss_kernel_benchmark_checks_both_kernels_agree_and_reports_the_ratio():
    out = run_bench("bench.loss_kernel", "--frames", "3", "--student", "6", "8", "--teacher", "5", "5", "--dim", "16",
                    "--rounds", "2")
    assert "| crepa_scores |" in out and "| per-frame loop |" in out and "both give the same scores" in out


def test_loader_benchmark_reads_every_format():
    out = run_bench("bench.loader", "--scale", "small", "--rounds", "1")
    for row in ("| zarr | 0 |", "| zarr, codec none | 2 |", "| webdataset | 4 |", "| safetensors | 0 |"):
        assert row in out
    assert re.search(r"goal \(well above, >2x\) (met|missed)\.", out)  # reported; how fast depends on the machine


def test_storage_benchmark_measures_every_dtype_and_codec():
    out = run_bench("bench.storage", "--encoders", "dinov2_vits14", "--image-sizes", "224")
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        assert f"| {dtype} |" in out
    assert "Codecs against none" in out and "Against the fp32 teacher" in out


def test_memory_benchmark_predicts_every_setting_and_checks_against_a_real_step():
    out = run_bench("bench.memory", "--scale", "tiny")
    for base in ("bf16", "fp8"):
        assert f"| tiny Wan | {base} |" in out
    assert "| 3 / 3 |" in out and re.search(r"\| tiny Wan \| [\d,]+ \| [\d,]+ \| [\d,]+ \| [+-][\d.]+% \|", out)


def test_load_memory_benchmark_loads_every_variant():
    out = run_bench("bench.load_memory", "--scale", "tiny", "--rounds", "1")
    for variant in ("bf16: from_pretrained", "fp8 before:", "fp8 now: load_base"):
        assert f"| {variant}" in out
