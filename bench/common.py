"""What every benchmark shares: the machine it ran on, side-by-side timing, and the results file.

Ratios are only meaningful when the variants ran in the same process, interleaved, so that
thermal state, page cache and other load hit them alike; `time_alternating` does that.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

RESULTS = Path(__file__).with_name("RESULTS.md")
PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "zarr", "numcodecs", "webdataset",
            "safetensors", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming the CPU, the cores this process may use, the memory and the GPU (or its absence)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {cores} cores, {memory:.0f} GiB RAM, {gpu}"


def versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"Python {platform.python_version()}, " + ", ".join(found)


def synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                     device: torch.device | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured in interleaved rounds.

    Each round runs every variant once, starting from a different one each round, so no variant
    always follows the same neighbour (caches, allocator state, frequency boosts). `clock` is wall
    time by default; `time.process_time` with one torch thread counts a step's own work on a shared CPU.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = clock()
            variants[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return times


def status_bytes(field: str) -> int:
    """A size line of /proc/self/status in bytes, e.g. VmHWM (peak RSS; unlike ru_maxrss it is not carried over
    exec, so a child reports its own peak) or RssAnon."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


class TensorBytes(TorchDispatchMode):
    """Bytes of the tensors created inside the block that are alive, now (`current`) and at most (`peak`).

    Counts every storage an operator allocates (an output that aliases none of its inputs), once, until it is
    freed; a torch allocator's view of memory that works on any device, including fake tensors (whose sizes count
    though they hold no data). Tensors that existed before the block, and views of them, are not counted.
    """

    def __init__(self):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _count(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        if tensor.is_meta:  # shapes without memory (a fake tensor is not meta: it stands for real memory)
            return
        storage = tensor.untyped_storage()
        if storage._cdata in inputs or storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = weakref.finalize(storage, self._free, size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor, inputs)
        return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """Median with the min-max range, for printing."""
    return f"{median(values):.4g} [{min(values):.4g}, {max(values):.4g}]"


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--no-record", action="store_true", help=f"print only; do not append to {RESULTS.name}")
    return parser


def record(title: str, body: str, enabled: bool = True) -> None:
    """Print the result and append it to RESULTS.md as a dated entry with machine, command and versions."""
    command = "python -m " + Path(sys.argv[0]).with_suffix("").name
    if Path(sys.argv[0]).parent.name == "bench":
        command = "python -m bench." + Path(sys.argv[0]).with_suffix("").name
    command += "".join(" " + shlex.quote(arg) for arg in sys.argv[1:])
    entry = (f"\n## {dt.date.today().isoformat()} · {title}\n\n"
             f"- Machine: {machine()}\n- Command: `{command}`\n- Versions: {versions()}\n\n{body.strip()}\n")
    print(entry)
    if enabled:
        if not RESULTS.exists():
            RESULTS.write_text("# Benchmark results\n\nEntries are appended by the scripts in `bench/`; "
                               "the newest entry of each benchmark is at the bottom.\n")
        with RESULTS.open("a") as handle:
            handle.write(entry)
