"""Evaluate a trained model on held-out episodes: reconstruction, tracking, reward prediction, video.

What ``kp-rl eval --model RUN --data DIR --out OUT`` runs; the experiments and the demo use the same
functions, so every reported figure is computed one way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kp_rl.files import write_text
from kp_rl.data import FeatureSequences, SequenceDataset, encode_episodes
from kp_rl.envs import pixels_to_unit
from kp_rl.keypoints import preprocess_frames
from kp_rl.losses import reconstruction_loss
from kp_rl.metrics import fit_ridge, predict_ridge, reward_prediction_error, tracking_error
from kp_rl.model import PerceptionModel, load


@torch.inference_mode()
def reconstruction_errors(model: PerceptionModel, data: str | Path, mean_frame: torch.Tensor | None = None,
                          length: int = 8, max_windows: int = 256) -> dict[str, float]:
    """Mean per-frame reconstruction error (sum of squares / 2, the training loss) on held-out windows.

    Also the error of predicting the training set's mean frame (``mean_frame``; computed when not given).
    """
    if mean_frame is None:
        train = SequenceDataset(data, 1, split="train", keys=("image",))
        mean_frame = preprocess_frames(np.concatenate([e["image"] for e in train.episodes])).mean(0)
    val = SequenceDataset(data, length, split="val", stride=length, keys=("image",))
    windows = torch.stack([val[i]["image"] for i in range(min(len(val), max_windows))])
    model_err = mean_err = 0.0
    for chunk in windows.split(32):
        frames = preprocess_frames(chunk).to(model.device)
        reconstruction, _ = model.autoencoder(frames)
        model_err += float(reconstruction_loss(reconstruction, frames)) * len(chunk)
        mean_err += float(reconstruction_loss(mean_frame.to(frames.device).expand_as(frames), frames)) * len(chunk)
    return {"model": model_err / len(windows), "mean_frame": mean_err / len(windows), "windows": len(windows)}


def tracking(model: PerceptionModel, data: str | Path) -> dict[str, float]:
    """Held-out linear tracking error of the model's features vs the true body centres (unit coordinates)."""
    splits = {}
    for split in ("train", "val"):
        frames = SequenceDataset(data, 1, split=split, keys=("image", "true_object_pos"))
        features = np.concatenate(encode_episodes(model, frames.episodes))
        coords = np.concatenate([e["true_object_pos"] for e in frames.episodes])
        splits[split] = (features, pixels_to_unit(coords, model.image_size))
    err = tracking_error(*splits["train"], *splits["val"])
    pixels = (model.image_size - 1) / 2.0
    return {**err, **{f"{name}_px": rmse * pixels for name, rmse in err.items()}}


@torch.inference_mode()
def rollout_beliefs(dynamics: torch.nn.Module, features: Tensor, actions: Tensor,
                    observed: int) -> tuple[Tensor, Tensor]:
    """Observe ``observed`` steps, then roll open loop (posterior and prior means): the belief and reward at every step.

    Args:
        dynamics: a :class:`kp_rl.dynamics.KeypointVRNN`.
        features: ``(B, >= observed, D)``; actions: ``(B, T, A)`` for the whole window.
    Returns:
        ``(beliefs (B, T, belief_dim), rewards (B, T))``.
    """
    state = dynamics.initial_state(features.shape[0], features.device, features.dtype)
    beliefs, rewards = [], []
    for t in range(actions.shape[1]):
        if t < observed:
            state, out = dynamics.observe_step(state, features[:, t], actions[:, t])
        else:
            state, out = dynamics.imagine_step(state, actions[:, t], sample=False)
        beliefs.append(dynamics.belief(state))
        rewards.append(out.reward)
    return torch.stack(beliefs, 1), torch.stack(rewards, 1)


@torch.inference_mode()
def evaluate_reward_prediction(dynamics: torch.nn.Module, windows: dict[str, Tensor], observed: int,
                               num_samples: int, probe_windows: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Open-loop reward prediction of a VRNN over the predicted part of windows, every way the paper's readers ask.

    Args:
        dynamics: a :class:`kp_rl.dynamics.KeypointVRNN`.
        windows: held-out ``features`` (B, N + M, D), ``action`` (B, N + M, A), ``reward`` (B, N + M).
        observed: N, the steps observed (posterior) before predicting open loop.
        num_samples: S prior samples (stochastic models).
        probe_windows: training windows for the reward probe (below); ``None``: no probe.
    Returns:
        :func:`~kp_rl.metrics.reward_prediction_error` dicts (``mse``/``r2`` per predicted step and their means):
        ``prior_mean`` (the reward head on the prior-mean rollout: the headline); for stochastic models
        ``sample_mean`` (the mean of S sampled rollouts' rewards) and ``best_of_samples`` (per window the sample
        closest to the truth: an oracle selection, optimistic by construction); with ``probe_windows``,
        ``probe``: a ridge regression from the VRNN belief to the reward, fitted afterwards on the beliefs of
        the training windows' observed steps (the frozen VRNN, the paper's protocol), applied to the beliefs of
        the prior-mean rollout.
    """
    dynamics.eval()
    features, actions, rewards = windows["features"], windows["action"], windows["reward"]
    truth = rewards[:, observed:]
    beliefs, mean_rewards = rollout_beliefs(dynamics, features, actions, observed)
    out = {"prior_mean": reward_prediction_error(mean_rewards[:, observed:], truth)}
    if dynamics.cfg.stochastic and num_samples > 1:
        _, samples = dynamics.predict(features[:, :observed], actions, num_samples, sample=True)
        samples = samples[:, :, observed:]  # (S, B, M)
        out["sample_mean"] = reward_prediction_error(samples.mean(0), truth)
        best = (samples - truth).pow(2).mean(-1).argmin(0)  # (B,)
        out["best_of_samples"] = {**reward_prediction_error(samples[best, torch.arange(len(best))], truth),
                                  "num_samples": num_samples, "oracle_selected": True}
    if probe_windows is not None:
        seen, _ = rollout_beliefs(dynamics, probe_windows["features"], probe_windows["action"][:, :observed], observed)
        weights = fit_ridge(seen.flatten(0, 1).double(), probe_windows["reward"][:, :observed].reshape(-1, 1).double())
        probe = predict_ridge(weights, beliefs[:, observed:].flatten(0, 1).double()).reshape(truth.shape)
        out["probe"] = reward_prediction_error(probe, truth)
    return out


def reward_prediction(model: PerceptionModel, data: str | Path, stride: int = 4,
                      max_windows: int = 512) -> dict[str, Any]:
    """Open-loop reward prediction on held-out windows (observe N, predict M), with a mean-reward baseline."""
    if not model.has_dynamics:
        raise ValueError("reward prediction needs a model with dynamics")
    dyn = model.config.dynamics
    frames = SequenceDataset(data, 1, split="val", keys=("image", "action", "reward"))
    windows = FeatureSequences.from_frames(model, frames, dyn.sequence_length, stride=stride).stacked(max_windows)
    scores = evaluate_reward_prediction(model.dynamics, windows, dyn.observed_steps, dyn.num_samples)
    train = SequenceDataset(data, 1, split="train", keys=("image", "reward"))
    mean_reward = float(np.concatenate([e["reward"][1:] for e in train.episodes]).mean())
    truth = windows["reward"][:, dyn.observed_steps:]
    scores["mean_reward_baseline"] = reward_prediction_error(np.full(tuple(truth.shape), mean_reward), truth)
    scores["windows"] = len(truth)
    return scores


def evaluate(model_path: str | Path, data: str | Path, out: str | Path | None = None,
             device: str = "cpu") -> dict[str, Any]:
    """Every applicable evaluation of a checkpoint on a dataset's held-out episodes; JSON (+ video) in ``out``."""
    model = load(model_path, device=device)
    report: dict[str, Any] = {"model": str(model_path), "data": str(data), "representation": model.representation,
                              "reconstruction": reconstruction_errors(model, data), "tracking": tracking(model, data)}
    if model.has_dynamics:
        report["reward_prediction"] = reward_prediction(model, data)
    if out is not None:
        out = Path(out)  # its folders are made by the atomic writes
        write_text(out / "eval.json", json.dumps(report, indent=2, sort_keys=True,
                                                 default=lambda value: np.asarray(value).tolist()))  # arrays, tensors
        if model.has_dynamics:
            write_video_prediction({"sample": model}, data, out / "video_prediction", num_samples=3)
    return report


def write_video_prediction(models: dict[str, PerceptionModel], data: str | Path, path_stem: str | Path,
                           num_samples: int, title: str | None = None) -> None:
    """The first held-out episode of ``data`` and ``num_samples`` open-loop predictions of it by each model (label ->
    model with dynamics, all with one dynamics config), written by :func:`kp_rl.video.write_comparison`."""
    from kp_rl.video import predict_frames, write_comparison

    dyn = next(iter(models.values())).config.dynamics
    episode = SequenceDataset(data, 1, split="val", keys=("image", "action")).episodes[0]
    horizon = min(len(episode["image"]) - 1, dyn.observed_steps + 3 * dyn.predicted_steps)
    frames, actions = episode["image"][None, 1:1 + horizon], episode["action"][None, 1:1 + horizon]
    rows = {"truth": frames[0]}
    for label, model in models.items():
        predicted = predict_frames(model, frames[:, :dyn.observed_steps], actions, num_samples=num_samples)
        rows.update({f"{label} {s + 1}": predicted["frames"][s, 0] for s in range(num_samples)})
    write_comparison(rows, path_stem, observed=dyn.observed_steps, title=title)
