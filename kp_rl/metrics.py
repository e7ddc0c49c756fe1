"""Evaluation metrics: image quality (PSNR, SSIM: torchmetrics), linear probes (coordinate tracking error),
reward-prediction error, and the Frechet distance between feature sets.

FVD is not computed: its I3D weights (Kinetics-400) do not ship with kp_rl. With a local copy, compute the I3D
features of both sets of videos yourself and call :func:`frechet_distance_from_features`.

Conventions: inputs are numpy arrays or torch tensors (any device; they are copied to CPU); outputs are Python
floats for scalars and numpy arrays (float64) for per-frame / per-step values. Frames are ``(..., H, W, C)``
with ``channels_last=True`` (the default, as the env and the ``.npz`` episodes store them) or ``(..., C, H, W)``;
per-frame metrics return one value per leading index, e.g. ``(B, T)`` for videos ``(B, T, H, W, C)``.

    >>> import numpy as np
    >>> frames = np.full((2, 8, 16, 16, 3), 0.5)                    # (B, T, H, W, C) in [0, 1]
    >>> psnr(frames + 0.1, frames).shape                             # one value per frame
    (2, 8)
    >>> round(float(psnr(frames + 0.1, frames)[0, 0]), 4)           # MSE 0.01 at range 1 -> 20 dB
    20.0
    >>> float(ssim(frames, frames).min())                            # identical frames
    1.0
    >>> mu, cov = np.zeros(2), np.eye(2)
    >>> round(frechet_distance(mu, cov, mu + [3.0, 4.0], cov), 6)  # same covariance: ||mu1 - mu2||^2
    25.0
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["psnr", "ssim", "fit_ridge", "predict_ridge", "tracking_error",
           "reward_prediction_error", "frechet_distance", "frechet_distance_from_features"]


def _np(x: np.ndarray | Tensor) -> np.ndarray:
    """A float64 numpy copy of an array or tensor (any device); cast before any arithmetic (uint8 wraps)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _frame_batch(pred: np.ndarray | Tensor, target: np.ndarray | Tensor,
                 channels_last: bool) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Both inputs as float64 ``(N, C, H, W)`` tensors, and the leading shape to restore."""
    p, t = torch.from_numpy(_np(pred)), torch.from_numpy(_np(target))
    if p.shape != t.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    if p.ndim < 3:
        raise ValueError(f"expected frames (..., H, W, C) or (..., C, H, W), got shape {tuple(p.shape)}")
    lead = tuple(p.shape[:-3])
    if channels_last:
        p, t = p.movedim(-1, -3), t.movedim(-1, -3)
    return p.reshape(-1, *p.shape[-3:]), t.reshape(-1, *t.shape[-3:]), lead


def psnr(pred: np.ndarray | Tensor, target: np.ndarray | Tensor, data_range: float = 1.0,
         channels_last: bool = True) -> np.ndarray:
    """Peak signal-to-noise ratio per frame, ``10 log10(data_range^2 / MSE)`` (torchmetrics), MSE over pixels
    and channels.

    Args:
        pred: frames ``(..., H, W, C)`` (``channels_last``) or ``(..., C, H, W)``; any dtype (cast to float64).
        target: same shape as ``pred``.
        data_range: max minus min of the pixel scale: 1.0 for [0, 1] or [-0.5, 0.5] floats, 255 for uint8.
        channels_last: layout of the last three axes.
    Returns:
        numpy float64 array of the leading shape ``(...)`` (0-d for a single frame), in dB. Identical frames
        give ``+inf``, which dominates any mean: filter with ``np.isfinite`` before averaging if that can happen.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    p, t, lead = _frame_batch(pred, target, channels_last)
    values = peak_signal_noise_ratio(p, t, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return values.numpy().reshape(lead)


SSIM_CHUNK = 128  # frames per torchmetrics call in ssim (bounds its memory)


def ssim(pred: np.ndarray | Tensor, target: np.ndarray | Tensor, data_range: float = 1.0,
         channels_last: bool = True) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) per frame, from torchmetrics.

    Gaussian window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, scored over the valid window positions (as in
    the authors' MATLAB code and ``tf.image.ssim``), averaged over positions and channels, in float64.

    Args:
        pred: frames ``(..., H, W, C)`` (``channels_last``) or ``(..., C, H, W)``, with H, W >= 11.
        target: same shape as ``pred``.
        data_range: max minus min of the pixel scale (1.0 for floats in [0, 1], 255 for uint8).
        channels_last: layout of the last three axes.
    Returns:
        numpy float64 array of the leading shape ``(...)`` (0-d for a single frame); 1.0 for identical frames.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    p, t, lead = _frame_batch(pred, target, channels_last)
    if min(p.shape[-2:]) < 11:
        raise ValueError(f"ssim needs H, W >= 11, got H={p.shape[-2]}, W={p.shape[-1]} with "
                         f"channels_last={channels_last}: check the layout")
    # torchmetrics averages over every pixel of a reflect-padded image; keep the windows inside the frame. In
    # chunks of frames: its intermediates take ~15 float64 copies of the batch (a few GB for a thousand frames)
    scores = []
    for start in range(0, len(p), SSIM_CHUNK):
        _, full = structural_similarity_index_measure(p[start:start + SSIM_CHUNK], t[start:start + SSIM_CHUNK],
                                                      data_range=data_range, reduction="none", return_full_image=True)
        scores.append(full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)))
    return torch.cat(scores).numpy().reshape(lead)


def _flat(x: np.ndarray | Tensor, name: str) -> np.ndarray:
    a = _np(x)
    if a.ndim == 0:
        raise ValueError(f"{name} must have a leading example axis, got a scalar")
    return a.reshape(a.shape[0], -1)


def fit_ridge(features: np.ndarray | Tensor, targets: np.ndarray | Tensor,
              ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression with an unpenalised bias: minimises ``||X W + b - Y||^2 + ridge ||W||^2``.

    Args:
        features: ``(N, ...)``, flattened to ``(N, D)`` (e.g. keypoints ``(N, K, 3)``).
        targets: ``(N, ...)``, flattened to ``(N, M)``.
        ridge: L2 penalty on the weights, on the raw feature scale (0 gives least squares, min-norm if singular).
    Returns:
        ``(W, b)``: numpy float64 weights ``(D, M)`` and bias ``(M,)``.
    """
    x, y = _flat(features, "features"), _flat(targets, "targets")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"features have {x.shape[0]} examples, targets {y.shape[0]}")
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    d = x.shape[1]
    a = np.concatenate([xc, np.sqrt(ridge) * np.eye(d)])  # ridge as extra rows: stable, handles ridge = 0
    b = np.concatenate([yc, np.zeros((d, y.shape[1]))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    return w, ym - xm @ w


def predict_ridge(weights: tuple[np.ndarray, np.ndarray], features: np.ndarray | Tensor) -> np.ndarray:
    """Predictions ``X W + b`` of a :func:`fit_ridge` model: numpy float64 ``(N, M)``."""
    w, b = weights
    return _flat(features, "features") @ w + b


def _rmse(pred: np.ndarray, target: np.ndarray) -> float:
    if pred.shape != target.shape:
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} differ in shape")
    return float(np.sqrt(np.mean((pred - target) ** 2)))


def tracking_error(keypoint_features_train: np.ndarray | Tensor, coords_train: np.ndarray | Tensor,
                   keypoint_features_test: np.ndarray | Tensor, coords_test: np.ndarray | Tensor,
                   ridge: float = 1e-3) -> dict[str, float]:
    """Coordinate tracking error (the paper's object-tracking metric): how linearly the keypoints encode the
    true positions of the bodies, measured on held-out frames.

    Args:
        keypoint_features_train: ``(N, ...)`` keypoints (e.g. ``(N, K, 3)``) of the training frames.
        coords_train: ``(N, ...)`` true coordinates, e.g. ``(N, num_bodies, 2)`` (``true_object_pos``).
        keypoint_features_test, coords_test: the same for held-out frames.
        ridge: L2 penalty of the linear readout.
    Returns:
        dict of floats, RMSE in coordinate units over all test frames and coordinates:
        ``keypoint_rmse`` (linear regression from keypoints), ``mean_baseline_rmse`` (predicting the train
        mean).
    """
    y_train, y_test = _flat(coords_train, "coords_train"), _flat(coords_test, "coords_test")
    readout = fit_ridge(keypoint_features_train, y_train, ridge)
    return {"keypoint_rmse": _rmse(predict_ridge(readout, keypoint_features_test), y_test),
            "mean_baseline_rmse": _rmse(np.broadcast_to(y_train.mean(0), y_test.shape), y_test)}


def reward_prediction_error(pred_rewards: np.ndarray | Tensor, true_rewards: np.ndarray | Tensor) -> dict:
    """Error of predicted rewards per prediction step, over ``N`` examples (open-loop rollouts of ``M`` steps).

    Args:
        pred_rewards: ``(N, M)`` predicted rewards.
        true_rewards: ``(N, M)`` rewards received.
    Returns:
        dict with numpy ``(M,)`` arrays ``mse`` and ``r2`` (``1 - SSE / SST`` per step, SST over the N examples
        around their mean; nan where SST = 0) and floats ``mse_mean`` and ``r2_mean`` (mean over steps, nan
        steps ignored; nan if every step is nan).
    """
    p, t = _np(pred_rewards), _np(true_rewards)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"expected pred and true rewards of one shape (N, M), got {p.shape} and {t.shape}")
    sse = ((p - t) ** 2).sum(0)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    r2 = np.full(sst.shape, np.nan)
    ok = sst > 0
    r2[ok] = 1.0 - sse[ok] / sst[ok]
    mse = sse / p.shape[0]
    return {"mse": mse, "r2": r2, "mse_mean": float(mse.mean()),
            "r2_mean": float(r2[ok].mean()) if ok.any() else float("nan")}


def frechet_distance(mu1: np.ndarray | Tensor, sigma1: np.ndarray | Tensor, mu2: np.ndarray | Tensor,
                     sigma2: np.ndarray | Tensor) -> float:
    """Frechet (2-Wasserstein) distance between Gaussians, ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``tr (S1 S2)^(1/2)`` is the sum of the square roots of the eigenvalues of ``S1 S2`` (real and >= 0 for
    covariances; round-off's imaginary parts and negative values are dropped), which needs no matrix square root.

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)``.
    Returns:
        The distance (float, >= 0; round-off below 0 is clipped).
    """
    m1, m2 = np.atleast_1d(_np(mu1)), np.atleast_1d(_np(mu2))
    s1, s2 = np.atleast_2d(_np(sigma1)), np.atleast_2d(_np(sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {m1.shape} / {m2.shape}, sigma {s1.shape} / {s2.shape}")
    root_trace = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(min=0)).sum()
    diff = m1 - m2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * root_trace, 0.0))


def frechet_distance_from_features(features1: np.ndarray | Tensor, features2: np.ndarray | Tensor) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets.

    Args:
        features1: ``(N1, D)`` features, N1 >= 2 (use N well above D for a stable estimate).
        features2: ``(N2, D)`` features.
    Returns:
        The distance (float); 0 for identical sets up to round-off. Finite-sample bias makes it > 0 for two
        samples of one distribution, so compare values computed with the same N.
    """
    f1, f2 = _np(features1), _np(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"expected features (N1, D) and (N2, D) with N >= 2, got {f1.shape} and {f2.shape}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
