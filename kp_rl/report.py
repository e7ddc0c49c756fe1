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


KEYPOINT_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                             [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
                             [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
                             [170, 255, 195]], dtype=np.float32)


def draw_keypoints(frame: np.ndarray, keypoints: np.ndarray, radius: float = 1.5, min_mu: float = 0.05) -> np.ndarray:
    """Draw keypoints as coloured dots on a frame (numpy only).

    Args:
        frame: uint8 ``(H, W, 3)``.
        keypoints: ``(K, 3)`` (x, y, mu) with x: -1 left .. +1 right, y: +1 top .. -1 bottom; the dot's
            opacity is mu (keypoints with mu < ``min_mu`` are not drawn).
    Returns:
        A new uint8 ``(H, W, 3)`` frame.

    Example:
        >>> out = draw_keypoints(np.zeros((9, 9, 3), np.uint8), np.array([[-1.0, 1.0, 1.0]]), radius=0.5)
        >>> bool(out[0, 0].any()), bool(out[8, 8].any())
        (True, False)
    """
    height, width = frame.shape[:2]
    out = frame.astype(np.float32)
    rows, cols = np.mgrid[0:height, 0:width]
    for k, (x, y, mu) in enumerate(np.asarray(keypoints, np.float32)):
        if mu < min_mu:
            continue
        col, row = (x + 1.0) * 0.5 * (width - 1), (1.0 - y) * 0.5 * (height - 1)
        mask = (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
        alpha = float(np.clip(mu, 0.0, 1.0))
        out[mask] = (1 - alpha) * out[mask] + alpha * KEYPOINT_COLOURS[k % len(KEYPOINT_COLOURS)]
    return out.round().clip(0, 255).astype(np.uint8)
