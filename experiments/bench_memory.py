"""Memory of the training data: in-memory SequenceDataset vs StreamingSequenceDataset, extrapolated to 1M frames.

Writes a dataset of synthetic 64x64 episodes in the reference format (one ``.npz`` of ``image`` /
``action`` / ``reward`` per episode; random pixels, so nothing compresses away), then measures, each in a
fresh process, the peak resident memory (``ru_maxrss``) of:
  * ``imports``    : Python + torch + kp_rl, no data (the floor);
  * ``in-memory``  : ``SequenceDataset`` (every episode loaded), for 1/4, 1/2 and all of the dataset;
  * ``streaming``  : ``StreamingSequenceDataset`` (cache of 8 episodes) iterated through a DataLoader with
                     ``EpisodeBlockSampler`` for ``--batches`` batches of 32 windows of 16 frames.
The in-memory cost per frame is the slope of a least-squares line through the three sizes; 1M frames is that
line's value at 1M (extrapolated). Streaming does not grow with the dataset (checked at two sizes).

    python experiments/bench_memory.py [--frames 30000] [--episode-frames 501]

Writes results/bench_memory/{results.json, bench_memory.png}; the dataset goes to data/bench_memory (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys
import torch, kp_rl
from kp_rl.data import EpisodeBlockSampler, SequenceDataset, StreamingSequenceDataset
from torch.utils.data import DataLoader
mode, root, episodes, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
files = sorted(__import__("pathlib").Path(root).glob("*.npz"))[:episodes]
import shutil, tempfile, os
sub = tempfile.mkdtemp()
for f in files:
    os.symlink(f.resolve(), os.path.join(sub, f.name))
frames = 0
if mode == "in-memory":
    data = SequenceDataset(sub, 16, split="all")
    frames = data.num_frames
elif mode == "streaming":
    data = StreamingSequenceDataset(sub, 16, split="all", cache_size=8)
    frames = data.num_frames
    loader = DataLoader(data, batch_size=32, sampler=EpisodeBlockSampler(data, seed=0), num_workers=0)
    for i, batch in enumerate(loader):
        if i + 1 >= batches:
            break
shutil.rmtree(sub)
print(json.dumps({"frames": frames, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(mode: str, root: Path, episodes: int, batches: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(root), str(episodes), str(batches)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_dataset(root: Path, frames: int, episode_frames: int, size: int) -> int:
    """Reference-format episodes of random pixels (written once; kept for re-runs)."""
    root.mkdir(parents=True, exist_ok=True)
    episodes = max(1, frames // episode_frames)
    rng = np.random.default_rng(0)
    for i in range(episodes):
        path = root / f"episode-{i:06d}.npz"
        if path.exists():
            continue
        tmp = root / f".tmp-{i}.npz"
        np.savez(tmp, image=rng.integers(0, 256, (episode_frames, size, size, 3), dtype=np.uint8),
                 action=rng.uniform(-1, 1, (episode_frames, 1)).astype(np.float32),
                 reward=rng.uniform(0, 1, episode_frames).astype(np.float32))
        tmp.replace(path)
    return episodes


def main() -> None:
    from kp_rl.bench import machine
    from kp_rl.files import save_figure, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=30000)
    parser.add_argument("--episode-frames", type=int, default=501)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--data", default="data/bench_memory")
    parser.add_argument("--out", default="results/bench_memory")
    args = parser.parse_args()
    root, out = Path(args.data), Path(args.out)
    episodes = write_dataset(root, args.frames, args.episode_frames, args.size)
    rows = {"imports": measure("imports", root, episodes, 0)}
    sizes = sorted({max(1, episodes // 4), max(1, episodes // 2), episodes})
    rows["in-memory"] = [measure("in-memory", root, n, 0) for n in sizes]
    rows["streaming"] = [measure("streaming", root, n, args.batches) for n in (sizes[0], sizes[-1])]
    frames = np.array([r["frames"] for r in rows["in-memory"]], dtype=float)
    rss = np.array([r["peak_rss_mb"] for r in rows["in-memory"]])
    slope, intercept = np.polyfit(frames, rss, 1)
    million = 1_000_000
    result = {
        "dataset": {"episodes": episodes, "episode_frames": args.episode_frames, "size": args.size,
                    "frame_bytes": args.size * args.size * 3},
        "peak_rss_mb": rows,
        "in_memory_kb_per_frame": slope * 1024,
        "extrapolated_1M_frames_mb": {"in-memory": intercept + slope * million,
                                      "streaming": max(r["peak_rss_mb"] for r in rows["streaming"])},
        "notes": "peak RSS per fresh process; in-memory at 1M frames extrapolated linearly from three measured sizes; "
                 "streaming measured at two sizes (flat). DataLoader workers would each hold their own cache.",
        "machine": machine(),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)

    print(f"{'mode':12s} {'frames':>8s} {'peak RSS (MB)':>14s}")
    print(f"{'imports':12s} {0:8d} {rows['imports']['peak_rss_mb']:14.0f}")
    for mode in ("in-memory", "streaming"):
        for r in rows[mode]:
            print(f"{mode:12s} {r['frames']:8d} {r['peak_rss_mb']:14.0f}")
    e = result["extrapolated_1M_frames_mb"]
    print(f"in-memory: {result['in_memory_kb_per_frame']:.1f} KB per frame -> 1M frames ~ {e['in-memory'] / 1024:.1f} GB; "
          f"streaming: {e['streaming']:.0f} MB at any size")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(frames, rss, "o-", label="in-memory SequenceDataset")
    sf = [r["frames"] for r in rows["streaming"]]
    ax.plot(sf, [r["peak_rss_mb"] for r in rows["streaming"]], "s-", label="StreamingSequenceDataset (cache 8)")
    ax.axhline(rows["imports"]["peak_rss_mb"], color="0.5", linestyle="--", label="imports only")
    ax.set_xlabel(f"frames ({args.size}x{args.size} RGB)")
    ax.set_ylabel("peak RSS (MB)")
    ax.legend(fontsize=7)
    save_figure(fig, out / "bench_memory.png")


if __name__ == "__main__":
    main()
