"""What `--base-dtype` saves and costs: (a) base-weight bytes of Wan 1.3B and 14B, (b) peak memory and step
time of LoRA training on an fp32, bf16 and fp8 base, (c) how far the bf16 and fp8 loss curves drift from fp32.

(a) counts bytes on the meta device (no weights, any machine). (b) and (c): one fresh process per variant
loads a scaled Wan 2.1 1.3B (real widths, few blocks) saved in fp32, through the trainer's own path
(`load_pretrained` with the variant's load dtype, LoRA, `prepare_base`), and runs the same steps with the
same seeds: peak RSS (VmHWM) after loading and after training, median step time, and the loss of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

from bench.common import markdown_table, median, parser, record, status_bytes
from bench.real_configs import WAN_1_3B, WAN_14B, wan_transformer
from bench.train_step import peak_bytes
from train.precision import LOAD_DTYPE, base_bytes, prepare_base

BASE_DTYPES = ("fp32", "bf16", "fp8")
MODELS = {"Wan 2.1 1.3B": WAN_1_3B, "Wan 2.1 14B": WAN_14B}
GIB, MIB = 2**30, 2**20


def as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """What `from_pretrained(torch_dtype=dtype)` holds: `dtype`, except the model's `_keep_in_fp32_modules`."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype != torch.float32 else []
    for name, param in model.named_parameters():
        if not any(module in name.split(".") for module in keep):
            param.data = param.data.to(dtype)
    return model


def weight_bytes(config: dict, base_dtype: str, lora_rank: int) -> dict[str, int]:
    """Frozen base bytes, and LoRA parameter count, for one model and dtype, counted on the meta device."""
    from crepa.families import get_family
    from train.lora import add_lora

    with torch.device("meta"):
        model = as_loaded(wan_transformer(config=config), LOAD_DTYPE[base_dtype])
        add_lora(model, lora_rank, lora_rank, 0.0, list(get_family("wan").default_lora_targets))
        prepare_base(model, base_dtype)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"base": base_bytes(model), "lora": lora, "params": sum(p.numel() for p in model.parameters()) - lora}


def memory_table(lora_rank: int) -> tuple[str, dict]:
    rows, sizes = [], {}
    for name, config in MODELS.items():
        counts = {dtype: weight_bytes(config, dtype, lora_rank) for dtype in BASE_DTYPES}
        sizes[name] = counts
        lora = counts["fp32"]["lora"]
        rows.append([name, f"{counts['fp32']['params'] / 1e9:.2f} B",
                     *(f"{counts[dtype]['base'] / GIB:.2f}" for dtype in BASE_DTYPES),
                     f"{lora / 1e6:.1f} M", f"{lora * 4 / MIB:.0f}", f"{lora * 12 / MIB:.0f}"])
    table = markdown_table(["model", "base params", "fp32 GiB", "bf16 GiB", "fp8 GiB", f"LoRA r{lora_rank} params",
                            "LoRA fp32 MiB", "grads + AdamW MiB"], rows)
    return table, sizes


class AnonPeak:
    """Highest anonymous RSS while the block runs, sampled every millisecond.

    Loading maps the safetensors file: its pages count in RSS but are page cache, shared and evictable;
    anonymous memory is what the loaded model itself holds.
    """

    def __enter__(self) -> AnonPeak:
        self.peak, self._done = status_bytes("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))


def measure(args) -> None:
    """Child process: load one variant through the trainer's path, train `steps` steps, print JSON."""
    from crepa.families import get_family
    from crepa.families.loading import load_pretrained
    from crepa.projector import CrepaProjector
    from crepa.schedule import CrepaWeightSchedule
    from train.config import TrainConfig
    from train.lora import add_lora
    from train.trainer import StepParts, build_optimizer, train_step

    adapter = get_family("wan")
    config = TrainConfig(base_dtype=args.variant, crepa_block_index=min(1, args.layers - 1), learning_rate=1e-3,
                         lora_rank=args.lora_rank)
    torch.manual_seed(0)
    before = status_bytes("RssAnon")
    with AnonPeak() as load:
        model = load_pretrained(adapter.transformer_class(), args.workdir, "transformer",
                                torch_dtype=LOAD_DTYPE[args.variant])
        add_lora(model, args.lora_rank, args.lora_rank, 0.0, list(adapter.default_lora_targets))
        prepare_base(model, args.variant)
    loaded = {"load_peak_anon": load.peak - before, "anon": status_bytes("RssAnon") - before,
              "file": status_bytes("RssFile")}
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the training peak below excludes loading
        f.write("5")
    model.train()
    projector = CrepaProjector(1536, 1536)
    optimizer = build_optimizer(config, model, projector)
    parts = StepParts(adapter, model, projector, CrepaWeightSchedule(config.schedule_config()), config, {})
    data = torch.Generator().manual_seed(1)  # the same batch for every variant
    tokens, width = adapter.default_text_max_length, adapter.text_embedding_dim(model)
    text = torch.zeros(1, tokens, width)
    text[:, :120] = torch.randn(1, 120, width, generator=data)
    batch = {"keys": ["clip"], "latents": torch.randn(1, 16, 3, 8, 14, generator=data), "text": text,
             "text_mask": torch.ones(1, tokens, dtype=torch.bool),
             "teacher": torch.randn(1, 3, 4, 7, 1536, generator=data).to(torch.float16)}
    losses, times = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        loss, _ = train_step(parts, batch, step, torch.device("cpu"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    print(json.dumps({**loaded, "peak": peak_bytes(torch.device("cpu")), "times": times[1:],
                      "losses": losses, "base": base_bytes(model)}))


def run_child(variant: str, args, workdir: str) -> dict:
    command = [sys.executable, "-m", "bench.precision", "--variant", variant, "--workdir", workdir,
               "--steps", str(args.steps), "--layers", str(args.layers), "--lora-rank", str(args.lora_rank),
               "--no-record"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # RSS follows live tensors (see train_step.py)
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def training_table(args) -> str:
    with tempfile.TemporaryDirectory(prefix="crepa-bench-") as workdir:
        torch.manual_seed(0)
        wan_transformer(args.layers).save_pretrained(os.path.join(workdir, "transformer"))  # fp32, as released
        runs: dict[str, list[dict]] = {variant: [] for variant in BASE_DTYPES}
        for round_index in range(args.rounds):  # alternate the order so no variant always runs first
            order = BASE_DTYPES if round_index % 2 == 0 else tuple(reversed(BASE_DTYPES))
            for variant in order:
                runs[variant].append(run_child(variant, args, workdir))
    first = {variant: results[0] for variant, results in runs.items()}
    step = {variant: median([t for r in results for t in r["times"]]) for variant, results in runs.items()}
    rows = []
    for variant in BASE_DTYPES:
        gap = max(abs(a - b) for a, b in zip(first[variant]["losses"], first["fp32"]["losses"], strict=True))
        rel = max(abs(a - b) / abs(b) for a, b in zip(first[variant]["losses"], first["fp32"]["losses"], strict=True))
        got = first[variant]
        rows.append([variant, f"{got['base'] / MIB:,.0f}", f"{got['load_peak_anon'] / MIB:,.0f}",
                     f"{got['anon'] / MIB:,.0f} / {got['file'] / MIB:,.0f}",
                     f"{max(r['peak'] for r in runs[variant]) / MIB:,.0f}", f"{step[variant]:.3f}",
                     f"{step[variant] / step['fp32']:.2f}", f"{gap:.4f}", f"{rel:.2%}"])
    table = markdown_table(["base", "base weights MiB", "load: peak anon MiB", "after load: anon / file MiB",
                            "training: peak RSS MiB",
                            "step s (median)", "time / fp32", "max |loss - fp32 loss|", "max relative"], rows)
    curves = "\n".join(f"- {variant}: " + ", ".join(f"{x:.4f}" for x in first[variant]["losses"])
                       for variant in BASE_DTYPES)
    setup = (f"Wan 2.1 1.3B transformer with {args.layers} of 30 blocks saved in fp32, loaded by the trainer's path; "
             f"LoRA rank {args.lora_rank} on attention, CREPA from a cached teacher, AdamW lr 1e-3; batch 1 x 3 latent "
             f"frames x 8x14, 512 text tokens; {args.steps} steps per process, {args.rounds} processes per variant in "
             "alternating order. Load: the model's anonymous memory (peak, sampled every ms, and after loading) and "
             "the mapped checkpoint's file pages (page cache, evictable); training: the process's peak RSS from the "
             "end of loading on (VmHWM reset), with torch, Python and the batch.")
    return f"{setup}\n\n{table}\n\nLoss per step (first process of each variant):\n\n{curves}"


def main() -> None:
    args = _arguments()
    if args.variant:
        measure(args)
        return
    table, sizes = memory_table(args.lora_rank)
    body = ("(a) Base-weight bytes resident for training, counted on the meta device: the model as "
            "`from_pretrained(torch_dtype=...)` loads it (diffusers keeps `_keep_in_fp32_modules` in fp32), "
            "then `prepare_base` (fp8: frozen linear layers as float8_e4m3fn + one fp32 scale each). LoRA on "
            f"to_q/to_k/to_v/to_out.0 at rank {args.lora_rank}: fp32 weights, and fp32 grads + two AdamW moments."
            f"\n\n{table}\n\n(b), (c) Training on each base:\n\n{training_table(args)}")
    record("Base weight precision", body, enabled=not args.no_record)


def _arguments():
    parser_ = parser(__doc__.splitlines()[0])
    parser_.add_argument("--layers", type=int, default=3, help="Wan 1.3B blocks kept for (b) and (c)")
    parser_.add_argument("--steps", type=int, default=10)
    parser_.add_argument("--rounds", type=int, default=2, help="processes per variant for (b)")
    parser_.add_argument("--lora-rank", type=int, default=32)
    parser_.add_argument("--variant", choices=BASE_DTYPES, help=argparse.SUPPRESS)
    parser_.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser_.parse_args()


if __name__ == "__main__":
    main()
