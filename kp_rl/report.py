"""Small reports users read: dataset summaries and figure grids (JSON + PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kp_rl.data import atomic_write_json, episode_files, load_episode, read_manifest


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def dataset_summary(root: str | Path, out: str | Path | None = None, episodes_shown: int = 4) -> dict[str, Any]:
    """Describe a dataset (counts, shapes, reward statistics); with ``out``, write summary.json + frames.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    files = episode_files(root)
    episodes = [load_episode(f) for f in files]
    returns = np.array([e["reward"].sum() for e in episodes]) if "reward" in episodes[0] else np.zeros(len(files))
    summary: dict[str, Any] = {
        "root": str(root),
        "episodes": len(episodes),
        "frames": int(sum(len(e["image"]) for e in episodes)),
        "arrays": {k: list(v.shape[1:]) for k, v in episodes[0].items()},
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
    }
    if (root / "manifest.json").exists():
        manifest = read_manifest(root)
        summary.update(env_id=manifest["env_id"], seed=manifest["seed"], policy=manifest["policy"])
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        shown = episodes[:episodes_shown]
        columns = 8
        fig, axes = plt.subplots(len(shown), columns, figsize=(columns * 1.2, len(shown) * 1.3), squeeze=False)
        for row, episode in enumerate(shown):
            steps = np.linspace(0, len(episode["image"]) - 1, columns).round().astype(int)
            for col, t in enumerate(steps):
                ax = axes[row, col]
                ax.imshow(episode["image"][t])
                if "true_object_pos" in episode:
                    pos = episode["true_object_pos"][t]
                    ax.scatter(pos[:, 0], pos[:, 1], s=6, c="red")
                ax.set_xlim(-0.5, episode["image"].shape[2] - 0.5)
                ax.set_ylim(episode["image"].shape[1] - 0.5, -0.5)
                ax.set_title(f"t={t}", fontsize=6)
                ax.axis("off")
        fig.suptitle(f"{summary.get('env_id', root.name)}: frames with projected body positions (red)", fontsize=8)
        save_figure(fig, out / "frames.png")
        atomic_write_json(out / "summary.json", summary)
    return summary
