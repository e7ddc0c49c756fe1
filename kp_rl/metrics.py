"""Evaluation metrics: image quality (PSNR, SSIM), linear probes (coordinate tracking error), reward-prediction
error, and Frechet distances between feature sets (FVD with a pluggable video feature network).

Conventions: inputs are numpy arrays or torch tensors (any device; they are copied to CPU); outputs are Python
floats for scalars and numpy arrays (float64) for per-frame / per-step values. Frames are ``(..., H, W, C)``
with ``channels_last=True`` (the default, as the env and the ``.npz`` episodes store them) or ``(..., C, H, W)``;
per-frame metrics return one value per leading index, e.g. ``(B, T)`` for videos ``(B, T, H, W, C)``.

    >>> import numpy as np
    >>> frames = np.full((2, 8, 16, 16, 3), 0.5)                    # (B, T, H, W, C) in [0, 1]
    >>> psnr(frames + 0.1, frames).shape                             # one value per frame
    (2, 8)
    >>> round(float(psnr(frames + 0.1, frames)[0, 0]), 6)           # MSE 0.01 at range 1 -> 20 dB
    20.0
    >>> float(ssim(frames, frames).min())                            # identical frames
    1.0
    >>> per_step(psnr(frames + 0.1, frames)).round(3).tolist()[:3]  # mean over the batch, per time step
    [20.0, 20.0, 20.0]
    >>> mu, cov = np.zeros(2), np.eye(2)
    >>> round(frechet_distance(mu, cov, mu + [3.0, 4.0], cov), 6)  # same covariance: ||mu1 - mu2||^2
    25.0
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np
import scipy.linalg
import torch
from torch import Tensor, nn

__all__ = [
    "psnr",
    "ssim",
    "per_step",
    "fit_ridge",
    "predict_ridge",
    "linear_probe",
    "tracking_error",
    "reward_prediction_error",
    "frechet_distance",
    "frechet_distance_from_features",
    "FVD",
    "small_video_net",
]


def _np(x: np.ndarray | Tensor) -> np.ndarray:
    """A float64 numpy copy of an array or tensor (any device); cast before any arithmetic (uint8 wraps)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_frames(pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}")
    if pred.ndim < 3:
        raise ValueError(f"expected frames (..., H, W, C) or (..., C, H, W), got shape {pred.shape}")


# ----------------------------------------------------------------------------------------------- image quality


def psnr(
    pred: np.ndarray | Tensor, target: np.ndarray | Tensor, data_range: float = 1.0, channels_last: bool = True
) -> np.ndarray:
    """Peak signal-to-noise ratio per frame, ``10 log10(data_range^2 / MSE)``, MSE over pixels and channels.

    Args:
        pred: frames ``(..., H, W, C)`` (``channels_last``) or ``(..., C, H, W)``; any dtype (cast to float64).
        target: same shape as ``pred``.
        data_range: max minus min of the pixel scale: 1.0 for [0, 1] or [-0.5, 0.5] floats, 255 for uint8.
        channels_last: layout of the last three axes (PSNR does not depend on it; kept for symmetry with ssim).
    Returns:
        numpy float64 array of the leading shape ``(...)`` (0-d for a single frame), in dB. Identical frames
        give ``+inf``, which dominates any mean: filter with ``np.isfinite`` before averaging if that can happen.
    """
    del channels_last  # the reduction runs over all of the last three axes either way
    p, t = _np(pred), _np(target)
    _check_frames(p, t)
    mse = ((p - t) ** 2).mean(axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(i**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    data_range: float = 1.0,
    channels_last: bool = True,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) per frame, averaged over valid window positions and channels.

    Gaussian window 11 x 11 with sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid' filtering (no padding), as in the
    authors' MATLAB code and ``tf.image.ssim``. Each channel is scored on its own, then channels are averaged.
    Computed in float64 with a separable ``torch`` convolution over all frames at once (in chunks).

    Args:
        pred: frames ``(..., H, W, C)`` (``channels_last``) or ``(..., C, H, W)``, with H, W >= ``window_size``.
        target: same shape as ``pred``.
        data_range: max minus min of the pixel scale (1.0 for floats in [0, 1], 255 for uint8).
        channels_last: layout of the last three axes.
        window_size, sigma, k1, k2: the standard constants; change only to reproduce another convention.
    Returns:
        numpy float64 array of the leading shape ``(...)`` (0-d for a single frame); 1.0 for identical frames.
    """
    p, t = _np(pred), _np(target)
    _check_frames(p, t)
    if channels_last:
        p, t = np.moveaxis(p, -1, -3), np.moveaxis(t, -1, -3)
    lead, (c, h, w) = p.shape[:-3], p.shape[-3:]
    if h < window_size or w < window_size:
        raise ValueError(
            f"ssim needs H, W >= {window_size}, got H={h}, W={w} from shape {tuple(p.shape)} "
            f"with channels_last={channels_last}: check the layout"
        )
    g = _gaussian_window(window_size, sigma)
    gy, gx = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    x = torch.from_numpy(np.ascontiguousarray(p)).reshape(-1, 1, h, w)
    y = torch.from_numpy(np.ascontiguousarray(t)).reshape(-1, 1, h, w)
    out = []
    chunk = 1024
    for s in range(0, x.shape[0], chunk):
        xs, ys = x[s : s + chunk], y[s : s + chunk]
        n = xs.shape[0]
        stats = torch.cat([xs, ys, xs * xs, ys * ys, xs * ys])
        stats = torch.nn.functional.conv2d(torch.nn.functional.conv2d(stats, gy), gx)
        mx, my, exx, eyy, exy = stats.split(n)
        vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
        ssim_map = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(ssim_map.mean(dim=(-3, -2, -1)))
    per_channel = torch.cat(out).numpy().reshape(*lead, c)
    return per_channel.mean(axis=-1)


def per_step(metric_values: np.ndarray | Tensor) -> np.ndarray:
    """Mean over the batch of per-frame values ``(B, T)`` -> ``(T,)`` numpy float64 (per-step curves).

    Args:
        metric_values: ``(B, T)`` or ``(B, T, ...)``, e.g. ``psnr`` / ``ssim`` outputs for videos ``(B, T, ...)``.
    Returns:
        numpy array ``(T, ...)``. Infinite PSNR values (identical frames) make the mean infinite.
    """
    v = _np(metric_values)
    if v.ndim < 2:
        raise ValueError(f"expected (B, T) values, got shape {v.shape}")
    return v.mean(axis=0)


# ----------------------------------------------------------------------------------------------- linear probes


def _flat(x: np.ndarray | Tensor, name: str) -> np.ndarray:
    a = _np(x)
    if a.ndim == 0:
        raise ValueError(f"{name} must have a leading example axis, got a scalar")
    return a.reshape(a.shape[0], -1)


def fit_ridge(
    features: np.ndarray | Tensor, targets: np.ndarray | Tensor, ridge: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
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


def linear_probe(
    features_train: np.ndarray | Tensor,
    targets_train: np.ndarray | Tensor,
    features_test: np.ndarray | Tensor,
    targets_test: np.ndarray | Tensor,
    ridge: float = 1e-3,
) -> float:
    """Held-out error of a linear readout: fit :func:`fit_ridge` on train, score on test.

    Args:
        features_train, features_test: ``(N, ...)`` features (flattened per example).
        targets_train, targets_test: ``(N, ...)`` targets (flattened per example).
        ridge: L2 penalty, see :func:`fit_ridge`.
    Returns:
        Root mean squared error over all test examples and target dimensions, in target units (float).
    """
    model = fit_ridge(features_train, targets_train, ridge)
    return _rmse(predict_ridge(model, features_test), _flat(targets_test, "targets_test"))


def tracking_error(
    keypoint_features_train: np.ndarray | Tensor,
    coords_train: np.ndarray | Tensor,
    keypoint_features_test: np.ndarray | Tensor,
    coords_test: np.ndarray | Tensor,
    supervised_train: np.ndarray | Tensor | None = None,
    supervised_test: np.ndarray | Tensor | None = None,
    ridge: float = 1e-3,
) -> dict[str, float]:
    """Coordinate tracking error (the paper's object-tracking metric): how linearly the keypoints encode the
    true positions of the bodies, measured on held-out frames.

    Args:
        keypoint_features_train: ``(N, ...)`` keypoints (e.g. ``(N, K, 3)``) of the training frames.
        coords_train: ``(N, ...)`` true coordinates, e.g. ``(N, num_bodies, 2)`` (``true_object_pos``).
        keypoint_features_test, coords_test: the same for held-out frames.
        supervised_train: optional predictions of ``coords_train`` by a supervised model (a reference).
        supervised_test: optional predictions of ``coords_test`` by that model, already made.
        ridge: L2 penalty of the linear readout.
    Returns:
        dict of floats, RMSE in coordinate units over all test frames and coordinates:
        ``keypoint_rmse`` (linear regression from keypoints), ``mean_baseline_rmse`` (predicting the train
        mean), and when given ``supervised_rmse`` (test) and ``supervised_train_rmse``.
    """
    y_train, y_test = _flat(coords_train, "coords_train"), _flat(coords_test, "coords_test")
    out = {
        "keypoint_rmse": linear_probe(keypoint_features_train, y_train, keypoint_features_test, y_test, ridge),
        "mean_baseline_rmse": _rmse(np.broadcast_to(y_train.mean(0), y_test.shape), y_test),
    }
    if supervised_test is not None:
        out["supervised_rmse"] = _rmse(_flat(supervised_test, "supervised_test"), y_test)
    if supervised_train is not None:
        out["supervised_train_rmse"] = _rmse(_flat(supervised_train, "supervised_train"), y_train)
    return out


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
    return {
        "mse": mse,
        "r2": r2,
        "mse_mean": float(mse.mean()),
        "r2_mean": float(r2[ok].mean()) if ok.any() else float("nan"),
    }


# ---------------------------------------------------------------------------------------------- Frechet distance


def frechet_distance(
    mu1: np.ndarray | Tensor, sigma1: np.ndarray | Tensor, mu2: np.ndarray | Tensor, sigma2: np.ndarray | Tensor,
    eps: float = 1e-6,
) -> float:
    """Frechet (2-Wasserstein) distance between Gaussians, ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    Args:
        mu1, mu2: means ``(D,)``.
        sigma1, sigma2: covariances ``(D, D)``.
        eps: added to both diagonals when ``S1 S2`` is singular or its square root not finite.
    Returns:
        The distance (float, >= 0; round-off below 0 is clipped). Raises ValueError if the square root keeps an
        imaginary part larger than 1e-3 (a sign of too few samples for the feature dimension).
    """
    m1, m2 = np.atleast_1d(_np(mu1)), np.atleast_1d(_np(mu2))
    s1, s2 = np.atleast_2d(_np(sigma1)), np.atleast_2d(_np(sigma2))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {m1.shape} / {m2.shape}, sigma {s1.shape} / {s2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)  # singular product: retry with the offset
        try:
            covmean = scipy.linalg.sqrtm(s1 @ s2)
            ok = bool(np.isfinite(covmean).all())
        except scipy.linalg.LinAlgWarning:
            ok = False
    if not ok:
        offset = np.eye(s1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary part of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = m1 - m2
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


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


# -------------------------------------------------------------------------------------------------------- FVD


class FVD:
    """Frechet Video Distance with a pluggable feature network.

    Published FVD numbers use an I3D network trained on Kinetics-400; its weights cannot be downloaded here, so
    the user supplies the network (or a local file through :meth:`from_file`). Values are only comparable
    between runs that use the same network, the same preprocessing and the same number of videos.

    Args:
        feature_net: module mapping videos ``(N, T, C, H, W)`` float32 to features ``(N, D)``.
        preprocess: optional callable applied to each float32 batch before the net (e.g. rescaling to [-1, 1],
            resizing, or permuting to ``(N, C, T, H, W)`` for an I3D TorchScript that expects that layout).
        device: where the net runs; defaults to the device of its first parameter (CPU if it has none).

    Example:
        >>> import torch
        >>> fvd = FVD(small_video_net(features=8, seed=0))
        >>> real = torch.rand(16, 4, 3, 16, 16)
        >>> fvd(real, real) < 1e-6
        True
    """

    def __init__(
        self,
        feature_net: nn.Module,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if device is None:
            param = next(iter(feature_net.parameters()), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.feature_net = feature_net.to(self.device)
        try:
            self.feature_net.eval()
        except NotImplementedError:  # modules from torch.export.load are fixed graphs without train/eval modes
            pass
        self.preprocess = preprocess

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        builder: Callable[[], nn.Module] | None = None,
        preprocess: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | str | None = None,
    ) -> "FVD":
        """Load the feature network from a local file.

        Args:
            path: a TorchScript file (``torch.jit.save``; e.g. an I3D export the user obtained elsewhere); a
                ``.pt2`` file from ``torch.export.save`` (export it with a dynamic batch dimension, or use a
                ``batch_size`` that divides the number of videos); or, with ``builder``, a ``state_dict`` saved
                with ``torch.save`` (optionally under a ``"state_dict"`` key).
            builder: callable returning the un-initialised module the state dict belongs to.
            preprocess, device: as in the constructor.
        Returns:
            An :class:`FVD` instance. Raises FileNotFoundError naming ``path`` if it does not exist.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"FVD feature network not found at {path!r}: the I3D weights used for published FVD cannot be "
                "downloaded here; save a TorchScript module (or a state dict + builder) there first"
            )
        map_location = torch.device(device) if device is not None else "cpu"
        if builder is None and path.endswith(".pt2"):
            net = torch.export.load(path).module()
        elif builder is None:
            net = torch.jit.load(path, map_location=map_location)  # deprecated in recent torch, still loads
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            net = builder()
            net.load_state_dict(state)
        return cls(net, preprocess=preprocess, device=device)

    def features(self, videos: np.ndarray | Tensor, batch_size: int = 16) -> np.ndarray:
        """Features ``(N, D)`` (numpy float64) of videos ``(N, T, C, H, W)``, computed in batches in eval mode."""
        v = videos if isinstance(videos, Tensor) else torch.from_numpy(np.asarray(videos))
        if v.ndim != 5:
            raise ValueError(f"expected videos (N, T, C, H, W), got shape {tuple(v.shape)}")
        out = []
        with torch.inference_mode():
            for s in range(0, v.shape[0], batch_size):
                x = v[s : s + batch_size].to(self.device, torch.float32)
                if self.preprocess is not None:
                    x = self.preprocess(x)
                f = self.feature_net(x)
                out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out).numpy()

    def __call__(
        self, real_videos: np.ndarray | Tensor, fake_videos: np.ndarray | Tensor, batch_size: int = 16
    ) -> float:
        """FVD between two sets of videos ``(N, T, C, H, W)`` (float; 0 for identical sets).

        Args:
            real_videos: reference videos.
            fake_videos: generated videos (the count may differ; keep it fixed across compared models).
            batch_size: videos per forward pass.
        Returns:
            Frechet distance between the Gaussians fitted to the two feature sets (float).
        """
        return frechet_distance_from_features(
            self.features(real_videos, batch_size), self.features(fake_videos, batch_size)
        )


class _SmallVideoNet(nn.Module):
    """Two strided 3-D convolutions, spatial-temporal pooling to 2 x 2 cells, a linear projection."""

    def __init__(self, in_channels: int, width: int, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, width, 3, stride=(1, 2, 2), padding=1)
        self.conv2 = nn.Conv3d(width, 2 * width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool3d((1, 2, 2))
        self.proj = nn.Linear(8 * width, features)

    def forward(self, videos: Tensor) -> Tensor:
        x = videos.permute(0, 2, 1, 3, 4)  # (N, T, C, H, W) -> (N, C, T, H, W)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.proj(self.pool(x).flatten(1))


def small_video_net(in_channels: int = 3, width: int = 8, features: int = 32, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised 3-D conv net mapping videos ``(N, T, C, H, W)`` to ``(N, features)``.

    A stand-in for I3D in tests and quick comparisons between our own models: distances computed with it are
    NOT comparable to published FVD numbers. Works with ``torch.jit.script`` and ``torch.export``. Needs H, W >= 2.

    Args:
        in_channels: C of the videos.
        width: filters of the first convolution (the second has twice as many).
        features: output dimension D.
        seed: initialisation seed (the global torch RNG is left untouched).
    Returns:
        The module, in eval mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _SmallVideoNet(in_channels, width, features)
    return net.eval()


@torch.inference_mode()
def evaluate_reward_prediction(dynamics: torch.nn.Module, windows: dict[str, Tensor], observed: int,
                     num_samples: int) -> dict[str, Any]:
    """Open-loop reward prediction of a VRNN over the predicted part of windows.

    Args:
        dynamics: a :class:`kp_rl.dynamics.KeypointVRNN`.
        windows: a batch with ``features`` (B, N + M, D), ``action`` (B, N + M, A), ``reward`` (B, N + M).
        observed: N, the steps the model observes (with the posterior) before predicting open loop.
        num_samples: S for the best-of-S figure (stochastic models only).
    Returns:
        ``prior_mean``: :func:`reward_prediction_error` of the prediction from the prior mean; and for
        stochastic models ``best_of_samples``: the same for the best of S prior samples per window
        (oracle-selected, an optimistic figure).
    """
    dynamics.eval()
    features, actions, rewards = windows["features"], windows["action"], windows["reward"]
    truth = rewards[:, observed:]
    _, mean_rewards = dynamics.predict(features[:, :observed], actions, 1, sample=False)
    out = {"prior_mean": reward_prediction_error(mean_rewards[0, :, observed:], truth)}
    if dynamics.cfg.stochastic and num_samples > 1:
        _, samples = dynamics.predict(features[:, :observed], actions, num_samples, sample=True)
        samples = samples[:, :, observed:]  # (S, B, M)
        best = (samples - truth).pow(2).mean(-1).argmin(0)  # (B,)
        out["best_of_samples"] = reward_prediction_error(samples[best, torch.arange(len(best))], truth)
        out["best_of_samples"]["num_samples"] = num_samples
    return out
