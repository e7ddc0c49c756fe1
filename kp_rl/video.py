"""Video prediction with a trained dynamics model: observe a few frames, imagine the rest, render them, score them.

The dynamics model predicts feature vectors (keypoints or a CNN latent, for Struct-VRNN or CNN-VRNN); the frame
autoencoder renders them against the first observed frame, so a prediction is a change from that frame.

Example (random weights, tiny sizes):
    >>> import numpy as np, kp_rl, tempfile, os
    >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4},
    ...                                       dynamics={"rnn_units": 16})
    >>> model = kp_rl.PerceptionModel(cfg, "keypoints", action_dim=1, with_dynamics=True).eval()
    >>> frames = np.zeros((2, 3, 32, 32, 3), np.uint8)                    # (B, T_obs, H, W, 3)
    >>> out = predict_frames(model, frames, np.zeros((2, 5, 1), np.float32), num_samples=2)
    >>> out["frames"].shape, out["frames"].dtype, out["rewards"].shape    # (S, B, T_obs + M, ...)
    ((2, 2, 5, 32, 32, 3), dtype('uint8'), (2, 2, 5))
    >>> scores = video_metrics(out["frames"], out["frames"][0])
    >>> float(scores["ssim_first_sample"].min())
    1.0
    >>> stem = os.path.join(tempfile.mkdtemp(), "video")
    >>> write_comparison({"truth": out["frames"][0, 0], "Struct-VRNN 1": out["frames"][1, 0]}, stem, observed=3)
    >>> sorted(os.listdir(os.path.dirname(stem)))
    ['video.gif', 'video.png']
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kp_rl.keypoints import preprocess_frames
from kp_rl.metrics import psnr, ssim
from kp_rl.model import PerceptionModel

__all__ = ["predict_frames", "write_comparison", "video_metrics", "to_uint8"]

PREDICTION_COLOUR = np.array([220, 30, 30], np.uint8)  # marks predicted (open-loop) steps
OBSERVED_COLOUR = np.array([40, 160, 60], np.uint8)  # marks observed steps


def to_uint8(frames: Tensor) -> np.ndarray:
    """Network frames ``(..., 3, H, W)`` in [-0.5, 0.5] -> uint8 pixels ``(..., H, W, 3)`` (clipped, rounded)."""
    pixels = ((frames.float().clamp(-0.5, 0.5) + 0.5) * 255.0).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu().numpy()


def predict_frames(model: PerceptionModel, frames: np.ndarray | Tensor, actions: np.ndarray | Tensor,
                   num_samples: int = 1, sample: bool = True) -> dict[str, np.ndarray]:
    """Observe ``T_obs`` frames, predict ``M`` more open loop, and render every step.

    Args:
        model: a :class:`PerceptionModel` with dynamics (keypoints or cnn representation).
        frames: uint8 ``(B, T_obs, H, W, 3)`` observed frames (numpy or torch), ``T_obs >= 1``.
        actions: ``(B, T_obs + M, A)``; ``actions[:, t]`` is taken before frame ``t``.
        num_samples: ``S`` rollouts per example (they share the observed part).
        sample: sample the prior while predicting (``False``: prior mean, all ``S`` rollouts alike).
    Returns:
        dict of numpy arrays: ``features`` float32 ``(S, B, T_obs + M, D)`` (the VRNN's reconstructions of the
        observed steps, then its predictions), ``rewards`` float32 ``(S, B, T_obs + M)`` and ``frames`` uint8
        ``(S, B, T_obs + M, H, W, 3)``, all rendered with the first observed frame (and its detected features)
        as the reference.
    """
    if not model.has_dynamics:
        raise ValueError("predict_frames needs a model with dynamics; this one is an autoencoder only "
                         "(train one with `kp-rl train dynamics --keypoints RUN`)")
    frames = torch.as_tensor(frames)
    size = model.image_size
    if frames.dtype != torch.uint8 or frames.dim() != 5 or tuple(frames.shape[2:]) != (size, size, 3):
        raise ValueError(f"frames: expected uint8 (B, T_obs, {size}, {size}, 3), got {frames.dtype} of shape "
                         f"{tuple(frames.shape)}")
    if frames.shape[1] < 1:
        raise ValueError("frames: need at least one observed frame (T_obs >= 1)")
    device = model.device
    actions = torch.as_tensor(actions, dtype=torch.float32, device=device)  # its shape: checked by the dynamics
    with torch.inference_mode():
        pixels = preprocess_frames(frames, device=device)  # (B, T_obs, 3, H, W)
        observed_features = model.autoencoder.features(pixels).float()  # (B, T_obs, D)
        features, rewards = model.dynamics.predict(observed_features, actions, num_samples, sample)
        first_frame, first_features = pixels[:, 0], observed_features[:, 0]
        rendered = [to_uint8(model.autoencoder.decode_features(features[s], first_frame, first_features))
                    for s in range(num_samples)]  # one sample at a time bounds the memory
    return {"features": features.float().cpu().numpy(), "rewards": rewards.float().cpu().numpy(),
            "frames": np.stack(rendered)}


def _label(tile_width: int, text: str, height: int = 11) -> np.ndarray:
    """A white band ``(height, tile_width, 3)`` with ``text`` in black (PIL's default bitmap font)."""
    from PIL import Image, ImageDraw

    band = Image.new("RGB", (tile_width, height), (255, 255, 255))
    ImageDraw.Draw(band).text((2, 0), text, fill=(0, 0, 0))
    return np.asarray(band)


def _comparison_frames(rows: dict[str, np.ndarray], observed: int) -> np.ndarray:
    """``(T, H', W', 3)`` uint8: the rows' frames side by side (2x up-scaled, names above), a timeline bar below
    (green observed, red predicted). Predicted tiles of every row but the first (the truth) get a red border.
    """
    names = list(rows)
    videos = [np.kron(rows[n], np.ones((1, 2, 2, 1), np.uint8)) for n in names]  # 64 px frames are small on screen
    steps, width = videos[0].shape[0], videos[0].shape[2]
    out = []
    for t in range(steps):
        tiles = []
        for i, video in enumerate(videos):
            tile = video[t].copy()
            if t >= observed and i > 0:
                tile[:2], tile[-2:], tile[:, :2], tile[:, -2:] = (PREDICTION_COLOUR,) * 4
            tile = np.concatenate([_label(width, names[i]), tile])
            tiles += [tile, np.full((tile.shape[0], 2, 3), 255, np.uint8)] if i < len(videos) - 1 else [tile]
        frame = np.concatenate(tiles, axis=1)
        bar = np.full((4, frame.shape[1], 3), 255, np.uint8)  # also keeps GIF encoders from merging equal frames
        colour = OBSERVED_COLOUR if t < observed else PREDICTION_COLOUR
        bar[:, : max(1, round(frame.shape[1] * (t + 1) / steps))] = colour
        out.append(np.concatenate([frame, bar]))
    return np.stack(out)


def write_comparison(rows: dict[str, np.ndarray], path_stem: str | Path, observed: int, fps: int = 8,
                     title: str | None = None) -> None:
    """Write ``<stem>.gif`` (rows side by side, one GIF frame per step) and ``<stem>.png`` (a strip), atomically.

    Args:
        rows: name -> uint8 video ``(T, H, W, 3)``, all of one shape; the first is the ground truth, e.g.
            ``{"truth": ..., "Struct-VRNN 1": ..., "Struct-VRNN 2": ..., "CNN-VRNN 1": ...}``.
        path_stem: output path without suffix (its folder is created).
        observed: number of observed steps; steps ``>= observed`` are open-loop predictions, marked with a red
            border (GIF: predicted tiles and a red timeline bar; PNG: red frame around predicted tiles).
        fps: GIF frame rate.
        title: PNG title (default: names the observed and predicted steps).
    """
    import imageio.v3 as iio
    from matplotlib.figure import Figure  # not pyplot: no global backend, nothing left open

    from kp_rl.files import save_figure, write_bytes

    if not rows:
        raise ValueError("rows is empty: pass at least the ground-truth video")
    shapes = {name: np.shape(video) for name, video in rows.items()}
    first = next(iter(shapes.values()))
    if len(first) != 4 or first[-1] != 3 or any(s != first for s in shapes.values()):
        raise ValueError(f"rows must all be uint8 videos (T, H, W, 3) of one shape, got {shapes}")
    rows = {name: np.asarray(video, np.uint8) for name, video in rows.items()}
    steps = first[0]
    stem = Path(path_stem)  # its folder is made by the atomic writes

    gif = iio.imwrite("<bytes>", _comparison_frames(rows, observed), extension=".gif",
                      duration=round(1000 / fps), loop=0)
    write_bytes(stem.with_name(stem.name + ".gif"), gif)

    fig = Figure(figsize=(steps * 0.9, len(rows) * 0.95))
    axes = fig.subplots(len(rows), steps, squeeze=False)
    for r, (name, video) in enumerate(rows.items()):
        for t in range(steps):
            ax = axes[r, t]
            ax.imshow(video[t])
            ax.set(xticks=[], yticks=[])
            predicted = t >= observed
            ax.spines[:].set(edgecolor="red" if predicted and r > 0 else "black",
                             linewidth=2.0 if predicted and r > 0 else 0.5)
            if r == 0:
                ax.set_title(f"t={t}" + ("\npredict" if t == observed else ""), fontsize=6,
                             color="red" if predicted else "black")
            if t == 0:
                ax.set_ylabel(name, fontsize=6, rotation=0, ha="right", va="center")
    fig.suptitle(title or f"observed t < {observed} (black), open-loop prediction t >= {observed} (red)",
                 fontsize=8)
    save_figure(fig, stem.with_name(stem.name + ".png"))


def video_metrics(pred: np.ndarray | Tensor, truth: np.ndarray | Tensor) -> dict[str, Any]:
    """Per-step PSNR and SSIM of predicted videos against the truth (mean over the batch).

    Args:
        pred: uint8 ``(S, B, T, H, W, 3)`` samples (e.g. ``predict_frames(...)["frames"]``).
        truth: uint8 ``(B, T, H, W, 3)``.
    Returns:
        dict of numpy float64 ``(T,)`` arrays: ``psnr_first_sample``, ``ssim_first_sample`` (sample 0) and
        ``psnr_best_of_samples``, ``ssim_best_of_samples`` (per example the sample with the best mean over
        time of that metric, as in SVG / Struct-VRNN evaluations), plus ``num_samples``. PSNR in dB on the
        0..255 scale (``inf`` for identical frames).
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.ndim != 6 or pred.shape[1:] != truth.shape:
        raise ValueError(f"expected pred (S, B, T, H, W, 3) and truth (B, T, H, W, 3) with matching shapes, "
                         f"got {pred.shape} and {truth.shape}")
    target = np.broadcast_to(truth, pred.shape)
    scores = {"psnr": psnr(pred, target, data_range=255.0), "ssim": ssim(pred, target, data_range=255.0)}  # (S, B, T)
    out: dict[str, Any] = {"num_samples": int(pred.shape[0])}
    for name, values in scores.items():
        best = values.mean(axis=2).argmax(axis=0)  # (B,): sample with the best mean over time
        out[f"{name}_first_sample"] = values[0].mean(axis=0)
        out[f"{name}_best_of_samples"] = values[best, np.arange(values.shape[1])].mean(axis=0)
    return out
