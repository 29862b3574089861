"""Host memory of loading the frozen base: the fp8 load before (whole model in bf16, then quantised) and now
(`load_base`: tensor by tensor, each linear quantised as it arrives), with the bf16 load beside them.

What it measures: one fresh child process per variant loads a Wan 2.1 1.3B transformer (real widths, `--scale`
sets the depth) saved in fp32 as released, and reports its peak resident memory over the load (VmHWM, reset just
before; it counts the checkpoint's pages a memory-mapped read touches) and its peak anonymous memory (sampled every
millisecond: the model's own memory), each minus the resident memory before loading, and the final weight bytes.
Why: fp8 exists to fit a model into little memory, and a load that first holds it in bf16 needs twice its final
size in host RAM (Wan 14B: 27 GiB before shrinking to 14 GiB), which is what kills such loads on 32 GB hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from bench.common import markdown_table, parser, record, status_bytes
from bench.precision import AnonPeak
from bench.real_configs import WAN_1_3B, wan_transformer
from crepa.families import get_family

VARIANTS = {"bf16": "bf16: from_pretrained(torch_dtype=bf16)",
            "fp8 before": "fp8 before: from_pretrained(bf16), then quantise_fp8",
            "fp8 now": "fp8 now: load_base, each linear quantised as read"}
SCALES = {"tiny": 0, "cpu": 3}
"""Blocks of the 30 kept; 0: the test suite's tiny Wan instead, for smoke runs. cpu: a checkpoint of 630 MB."""
MIB = 2**20


def load(variant: str, folder: str) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    from train.base_loading import load_base
    from train.precision import quantize_fp8

    if variant == "fp8 before":
        model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
        quantize_fp8(model.requires_grad_(False))
        return model
    return load_base(WanTransformer3DModel, folder, "transformer", None, variant.split()[0])


def measure(args) -> None:
    """Child process: one load; prints the memory it took as JSON."""
    from train.precision import base_bytes

    load("bf16", args.workdir)  # imports and first-call set-up out of the way; its memory is freed on return
    before, before_anon = status_bytes("VmRSS"), status_bytes("RssAnon")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM restarts from the current RSS
        f.write("5")
    with AnonPeak() as anon:
        model = load(args.variant, args.workdir)
    weights = base_bytes(model.requires_grad_(False))
    print(json.dumps({"peak": status_bytes("VmHWM") - before, "peak_anon": anon.peak - before_anon,
                      "anon": status_bytes("RssAnon") - before_anon, "weights": weights}))


def in_child(variant: str, workdir: str) -> dict:
    command = [sys.executable, "-m", "bench.load_memory", "--variant", variant, "--workdir", workdir, "--no-record"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # RSS follows live buffers (see precompute_memory.py)
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = _arguments()
    if args.variant:
        measure(args)
        return
    with tempfile.TemporaryDirectory(prefix="crepa-bench-") as workdir:
        torch.manual_seed(0)
        config = get_family("wan").tiny_transformer_config() if args.scale == "tiny" else WAN_1_3B
        wan_transformer(SCALES[args.scale] or None, config=config).save_pretrained(os.path.join(workdir, "transformer"))
        file_bytes = os.path.getsize(os.path.join(workdir, "transformer", "diffusion_pytorch_model.safetensors"))
        runs = {variant: [] for variant in VARIANTS}
        for round_index in range(args.rounds):  # alternate the order so no variant always runs first
            order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                runs[variant].append(in_child(variant, workdir))
    record("Base loading memory", _report(runs, file_bytes, args), enabled=not args.no_record)


def _report(runs: dict[str, list[dict]], file_bytes: int, args) -> str:
    rows = []
    for variant, label in VARIANTS.items():
        weights = runs[variant][0]["weights"]
        peak = max(r["peak"] for r in runs[variant])
        peak_anon = max(r["peak_anon"] for r in runs[variant])
        rows.append([label, f"{weights / MIB:,.0f}", f"{peak / MIB:,.0f}", f"{peak_anon / MIB:,.0f}",
                     f"{max(r['anon'] for r in runs[variant]) / MIB:,.0f}", f"{peak_anon / weights:.2f}"])
    before, now = (max(r["peak_anon"] for r in runs[v]) for v in ("fp8 before", "fp8 now"))
    model = f"Wan 2.1 1.3B transformer with {SCALES[args.scale]} of 30 blocks" if SCALES[args.scale] else "Tiny Wan"
    return (f"{model}, saved in fp32 ({file_bytes / MIB:,.0f} "
            f"MiB, one safetensors file); one fresh process per load, {args.rounds} per variant in alternating order, "
            "largest figure shown. Peak RSS: VmHWM over the load (with the checkpoint pages a memory-mapped read "
            "touches); peak anon: anonymous memory sampled every ms; both minus the process's before loading.\n\n"
            + markdown_table(["load", "final weights MiB", "peak RSS MiB", "peak anon MiB", "anon after MiB",
                              "peak anon / final weights"], rows)
            + f"\n\nThe fp8 load's peak anonymous memory goes from {before / MIB:,.0f} to {now / MIB:,.0f} MiB "
            f"({now / before:.2f}x).")


def _arguments():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="processes per variant")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    main()
