"""Small reports users read: dataset summaries and figure grids (JSON + PNG)."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kp_rl.files import save_figure, write_json, write_text
from kp_rl.data import episode_files, load_episode, read_manifest


def dataset_summary(root: str | Path, out: str | Path | None = None, episodes_shown: int = 4) -> dict[str, Any]:
    """Describe a dataset (counts, shapes, reward statistics); with ``out``, write summary.json + frames.png."""
    from matplotlib.figure import Figure  # not pyplot: no global backend, nothing left open

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
        out = Path(out)  # its folders are made by the atomic writes
        shown = episodes[:episodes_shown]
        columns = 8
        fig = Figure(figsize=(columns * 1.2, len(shown) * 1.3))
        axes = fig.subplots(len(shown), columns, squeeze=False)
        for row, episode in enumerate(shown):
            steps = np.linspace(0, len(episode["image"]) - 1, columns).round().astype(int)
            for col, t in enumerate(steps):
                ax = axes[row, col]
                ax.imshow(episode["image"][t])
                if "true_object_pos" in episode:
                    pos = episode["true_object_pos"][t]
                    ax.scatter(pos[:, 0], pos[:, 1], s=6, c="red")
                ax.set(xlim=(-0.5, episode["image"].shape[2] - 0.5), ylim=(episode["image"].shape[1] - 0.5, -0.5))
                ax.set_title(f"t={t}", fontsize=6)
                ax.axis("off")
        fig.suptitle(f"{summary.get('env_id', root.name)}: frames with projected body positions (red)", fontsize=8)
        save_figure(fig, out / "frames.png")
        write_json(out / "summary.json", summary)
    return summary


def draw_keypoints(frame: np.ndarray, keypoints: np.ndarray, radius: float | None = None) -> np.ndarray:
    """Draw keypoints as coloured dots; dot size and opacity grow with ``mu``.

    Args:
        frame: uint8 ``(H, W, 3)``.
        keypoints: ``(K, 3)`` rows ``(x, y, mu)``; x: -1 left .. +1 right, y: +1 top .. -1 bottom, mu in [0, 1]
            (a keypoint with ``mu = 0`` is invisible). Colours follow the keypoint index.
        radius: dot radius in pixels at ``mu = 1`` (default ``max(1.5, H / 32)``).
    Returns:
        A new uint8 ``(H, W, 3)`` image.

    Example:
        >>> frame = np.zeros((32, 32, 3), np.uint8)
        >>> out = draw_keypoints(frame, np.array([[-1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
        >>> bool(out[0, 0].max() > 0), bool(out[16, 16].max() == 0)   # top-left dot drawn; mu = 0 invisible
        (True, True)
    """
    frame = np.asarray(frame)
    keypoints = np.asarray(keypoints, np.float32)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) frame, got {frame.dtype} of shape {frame.shape}")
    if keypoints.ndim != 2 or keypoints.shape[-1] != 3:
        raise ValueError(f"expected keypoints (K, 3), got shape {keypoints.shape}")
    height, width = frame.shape[:2]
    radius = max(1.5, height / 32) if radius is None else radius
    mu = np.clip(keypoints[:, 2], 0.0, 1.0)
    cols = (keypoints[:, 0] + 1.0) * 0.5 * (width - 1)
    rows = (1.0 - keypoints[:, 1]) * 0.5 * (height - 1)
    sizes = radius * (0.5 + 0.5 * mu)
    dist2 = (np.arange(height)[None, :, None] - rows[:, None, None]) ** 2 + \
            (np.arange(width)[None, None, :] - cols[:, None, None]) ** 2  # (K, H, W)
    alpha = (dist2 <= sizes[:, None, None] ** 2) * mu[:, None, None]  # (K, H, W)
    colors = 255.0 * np.array([colorsys.hsv_to_rgb(k / len(keypoints), 1, 1) for k in range(len(keypoints))])
    out = frame.astype(np.float32)
    for k in np.argsort(mu):  # brightest keypoints drawn last, on top
        a = alpha[k][..., None]
        out = out * (1.0 - a) + colors[k] * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def keypoint_strip(models: dict[str, Any], frames: np.ndarray, path: str | Path, title: str,
                   columns: int = 8) -> None:
    """A PNG grid: one row per keypoint model, its keypoints drawn on ``columns`` frames spread over the first 120.

    Args:
        models: row label -> a keypoint :class:`~kp_rl.model.PerceptionModel`.
        frames: uint8 ``(T, H, W, 3)`` frames of one episode.
        path: the PNG written (atomically).
        title: the figure title.
    """
    from matplotlib.figure import Figure  # not pyplot: no global backend, nothing left open
    import torch

    frames = np.asarray(frames)
    steps = np.linspace(0, min(len(frames), 120) - 1, columns).round().astype(int)
    fig = Figure(figsize=(len(steps) * 1.3, len(models) * 1.45))
    axes = fig.subplots(len(models), len(steps), squeeze=False)
    for row, (name, model) in enumerate(models.items()):
        if model.representation != "keypoints":
            raise ValueError(f"keypoint_strip: {name!r} is a {model.representation!r} model, not a keypoint model")
        with torch.inference_mode():
            keypoints = model.encode(frames[steps]).float().cpu().numpy().reshape(len(steps), -1, 3)
        for col, t in enumerate(steps):
            ax = axes[row, col]
            ax.imshow(draw_keypoints(np.kron(frames[t], np.ones((2, 2, 1), np.uint8)), keypoints[col], radius=2.5))
            ax.set(xticks=[], yticks=[])
            if col == 0:
                ax.set_ylabel(name, fontsize=7)
            if row == 0:
                ax.set_title(f"t={t}", fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, Path(path))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (what experiment scripts write into their results README).

    >>> print(markdown_table(["agent", "return"], [["state", 843], ["pixels", 50]]))
    | agent | return |
    |---|---|
    | state | 843 |
    | pixels | 50 |
    """
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def experiment_readme(out: str | Path, script: str, doc: str, body: str, machine: dict[str, Any]) -> None:
    """Write ``out/README.md`` for an experiment script: its description (the script's docstring), the machine,
    this run's figures (``body``, markdown), and a pointer to ``HISTORY.md`` when the folder keeps one."""
    out = Path(out)
    title, _, rest = doc.strip().partition("\n")
    where = (f"{machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores"
             + (f", {machine['cuda']}" if machine.get("cuda") else "")
             + (f"; 1-minute load average {machine['load_avg_1min']:.2f}" if machine.get("load_avg_1min") is not None
                else ""))
    parts = [f"# {title.rstrip('.')} (`{script}`)", rest.strip(), f"Run of {machine.get('date', '?')} on {where}, "
             f"commit {machine.get('commit', '?')}.", body.strip()]
    if (out / "HISTORY.md").exists():
        parts.append("Earlier runs and what changed between them: [HISTORY.md](HISTORY.md).")
    write_text(out / "README.md", "\n\n".join(parts) + "\n")
