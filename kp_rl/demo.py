"""The embedded demo behind the README's main command (``scripts/demo.sh`` -> ``kp-rl demo``)."""

from __future__ import annotations

from pathlib import Path

from kp_rl.data import collect
from kp_rl.report import dataset_summary


def run_demo(out: Path, data: Path, quick: bool = False) -> None:
    """Collect a small cartpole-swingup dataset and report what it holds under ``out``."""
    episodes = 2 if quick else 20
    collect("cartpole-swingup", data, episodes, seed=0, workers=2, max_steps=20 if quick else None)
    summary = dataset_summary(data, out)
    print(f"dataset {data}: {summary['episodes']} episodes, {summary['frames']} frames, "
          f"return {summary['return_mean']:.1f} +- {summary['return_std']:.1f}")
    print(f"wrote {out / 'summary.json'} and {out / 'frames.png'}")
