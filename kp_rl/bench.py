"""Timing helpers shared by the benchmarks in ``experiments/``: medians of repeats, machine description."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from typing import Any, Callable


def median_rate(run: Callable[[], int], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Call ``run`` (returns how many items it processed) ``warmup + repeats`` times; items/s statistics."""
    for _ in range(warmup):
        run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        items = run()
        rates.append(items / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}


def commit() -> str | None:
    """The git commit of the working tree (``+dirty`` with uncommitted changes), or ``None`` outside git."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent  # the checkout kp_rl runs from, wherever the command was started
    git = lambda *args: subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                                       check=True).stdout.strip()
    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


@functools.cache
def cpu_info() -> tuple[str | None, frozenset[str]]:
    """The CPU's model name and feature flags from ``/proc/cpuinfo`` (None and no flags where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, frozenset()
    field = lambda name: next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), None)
    return field("model name"), frozenset((field("flags") or "").split())


def machine() -> dict[str, Any]:
    """What the numbers were measured on, when, and at which commit."""
    import torch

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # other work on the machine when the figures were taken (1-min load average: ~0 idle, ~cores busy)
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    info["cpu"], flags = cpu_info()
    # what sets a CPU's torch speed apart when the model name does not (virtual machines: "AMD EPYC")
    info["cpu_simd"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    return info


def machine_label(info: dict[str, Any] | None) -> str:
    """A cell's machine in a few words, for reading wall-clocks measured on different machines side by side."""
    if not info:
        return "machine not recorded"
    flags = info.get("cpu_simd", [])
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    device = info.get("cuda") or " ".join(x for x in (info.get("cpu", "CPU"), simd) if x)
    return f"{device}, {info.get('torch_threads')} torch thread(s)"
