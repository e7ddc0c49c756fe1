"""Structured vs unstructured dynamics: how well does each predict future rewards from a few observed frames?

The paper's comparison (Struct-VRNN vs CNN-VRNN), in our reward-head version. For each task (random-policy
data, ``cpu`` preset unless --preset) this trains three frame autoencoders ONCE per task, with seed 0:
  * keypoints (the paper's model), cnn (the unstructured baseline's flat latent), and keypoints without the
    sparsity and separation losses;
then, for every seed (seeds vary the dynamics models only), one VRNN + reward head per method:
  * ``struct``                 : Struct-VRNN on the keypoints,
  * ``cnn``                    : CNN-VRNN on the CNN latent (same VRNN class, same sizes),
  * ``struct_no_kp_losses``    : Struct-VRNN on the keypoints trained without sparsity + separation,
  * ``struct_deterministic``   : Struct-VRNN without the latent z (``dynamics.stochastic=False``),
  * ``struct_no_best_of_many`` : Struct-VRNN trained with one sample per step (``dynamics.best_of_many=False``),
  * ``state``                  : the same VRNN class on the true low-dimensional dm_control state (z-scored / 3,
                                 clipped to [-1, 1] for the tanh decoder): an upper reference,
and the trivial baseline ``mean_reward`` (the mean training reward at every step: R^2 ~ 0).

Evaluation on held-out episodes (the dataset's val split): windows of N observed + M predicted steps
(stride --eval-stride); the VRNN observes N steps of features and all N + M actions and predicts open loop with
the prior mean (``sample=False``); reward MSE and R^2 per predicted step (R^2 across windows). Stochastic
methods also report best-of-S (per window the prior sample with the lowest reward error: an optimistic,
oracle-selected number). Also: linear coordinate tracking error of each autoencoder's features (true body
centres, unit image coordinates), and per-step PSNR / SSIM of decoded video predictions (struct vs cnn).

    python experiments/reward_prediction.py [--tasks cartpole-swingup walker-walk] [--seeds 0 1 2]

Writes results/reward_prediction/{results.json, reward_per_step.png, summary.png, video_<task>.{gif,png}};
runs go to runs/reward_prediction/<task>/ and datasets to data/<task> (resumable, git-ignored; a dataset
collected by another experiment with the same seed is reused: only the first --frames worth of it is used).

Default budget on 2 CPU cores (target <= 60 minutes, the machine idle):
  * data: 7560 frames per task (60 cartpole episodes of 126 frames, 30 of 251 for reacher / cheetah, 15 of
    501 for walker) at ~360 frames/s with 2 workers: 4 x 21 s ~ 1.5 min.
  * autoencoders: 3 per task x 4 tasks = 12 runs x 250 steps (batch 16 x 8 frames) at ~0.5 s/step
    (keypoints; CNN ~0.3 s) ~ 8 x 125 s + 4 x 75 s ~ 22 min.
  * features: every frame encoded once per autoencoder (~230 frames/s keypoints, ~500 cnn):
    4 x (2 x 33 s + 15 s) ~ 5.5 min.
  * dynamics: 4 tasks x 3 seeds x 6 models = 72 runs x 800 steps (batch 32 windows of 16 steps). Measured on
    this machine with one torch thread (two threads are ~5x slower for these small GRU steps on a shared CPU,
    hence --dyn-threads 1): ~50 steps/s struct / struct_no_kp_losses / state, ~47 cnn, ~62 no-best-of-many,
    ~90 deterministic (30-50 % less when the other jobs load the cores). The six models of one (task, seed)
    take ~0.11 s per step -> 12 x 800 x 0.11 s ~ 18 min (+ validation / checkpoints every 250 steps).
  * evaluation, videos, plots: ~2 min.  Estimated total ~ 50 min idle; measured from scratch on an idle
    AMD EPYC with 2 cores: 30 min (1,779 s; the autoencoders took ~1 min each, not ~2). The seconds of every
    stage and the steps/s of every run land in results.json. --threads 1 is faster for everything when the
    cores are busy.
Features are computed once per autoencoder and handed to kp_rl.train.train_dynamics (``datasets=``).
"""

from __future__ import annotations

import argparse
import io
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import kp_rl
from kp_rl.bench import machine
from kp_rl.config import Config
from kp_rl.files import write_bytes, write_json
from kp_rl.data import FeatureSequences, collect, encode_episodes, episode_files, load_episode, split_episodes
from kp_rl.dynamics import KeypointVRNN
from kp_rl.envs import get_spec, pixels_to_unit
from kp_rl.evaluate import evaluate_reward_prediction
from kp_rl.metrics import reward_prediction_error, tracking_error
from kp_rl.model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint
from kp_rl.files import save_figure
from kp_rl.train import MODEL_FILE, fit, seed_everything, steps_per_second, train_autoencoder, train_dynamics
from kp_rl.video import predict_frames, video_metrics, write_comparison

KEYS = ("image", "action", "reward", "state", "true_object_pos")
AUTOENCODERS = ("keypoints", "cnn", "no_kp_losses")
# method -> (autoencoder it runs on, dynamics overrides); "state" runs on the true state instead
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "struct": ("keypoints", {}),
    "cnn": ("cnn", {}),
    "struct_no_kp_losses": ("no_kp_losses", {}),
    "struct_deterministic": ("keypoints", {"stochastic": False}),
    "struct_no_best_of_many": ("keypoints", {"best_of_many": False}),
    "state": ("state", {}),
}
BASELINE = "mean_reward"
LABELS = {"struct": "Struct-VRNN", "cnn": "CNN-VRNN", "struct_no_kp_losses": "Struct-VRNN, no kp losses",
          "struct_deterministic": "Struct-VRNN, deterministic",
          "struct_no_best_of_many": "Struct-VRNN, no best-of-many",
          "state": "state VRNN (upper ref.)", BASELINE: "mean reward"}
# The smoke run's logging cadence on top of the `tiny` preset (tests/test_reward_prediction.py)
QUICK_TRAIN = {"log_every": 2, "eval_every": 4, "checkpoint_every": 4, "image_every": 1000, "eval_batches": 1}


# ------------------------------------------------------------------------------------------------------ data
def load_split(root: Path, split: str, frames: int) -> list[dict[str, np.ndarray]]:
    """Episodes of one split of the dataset's own train/val split (the one the autoencoders trained on),
    capped at ``frames`` frames (at least one episode)."""
    episodes, total = [], 0
    for path in split_episodes(episode_files(root), split, val_fraction=0.1):
        if episodes and total >= frames:
            break
        episodes.append(load_episode(path, keys=KEYS))
        total += len(episodes[-1]["image"])
    return episodes


def with_features(episodes: list[dict[str, np.ndarray]], features: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{**e, "features": f} for e, f in zip(episodes, features)]


# ------------------------------------------------------------------------------------------- dynamics models
class StateDynamics(nn.Module):
    """The VRNN on true states, a :class:`kp_rl.train.Trainable` bundle for :func:`kp_rl.train.fit`, with the
    state normalisation kept as buffers. Checkpoints use the kp_rl checkpoint header (so ``fit`` can resume them)
    with ``representation: "state"``; reload with :meth:`load`."""

    def __init__(self, config: Config, state_dim: int, action_dim: int,
                 mean: np.ndarray | None = None, scale: np.ndarray | None = None) -> None:
        super().__init__()
        self.config = config
        self.dynamics = KeypointVRNN(config.dynamics, state_dim, action_dim)
        as_buffer = lambda x, default: torch.as_tensor(default if x is None else x, dtype=torch.float32)
        self.register_buffer("mean", as_buffer(mean, np.zeros(state_dim)))
        self.register_buffer("scale", as_buffer(scale, np.ones(state_dim)))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, path: str | Path, train_state: dict[str, Any] | None = None) -> None:
        buffer = io.BytesIO()
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "representation": "state",
                    "config": self.config.to_dict(), "state_dim": self.dynamics.feature_dim,
                    "action_dim": self.dynamics.action_dim, "state_dict": self.state_dict(),
                    "train_state": train_state}, buffer)
        write_bytes(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> "StateDynamics":
        data = read_checkpoint(path)
        model = cls(Config.from_dict(data["config"]), data["state_dim"], data["action_dim"])
        model.load_state_dict(data["state_dict"])
        return model.eval()


def train_vrnn(model: nn.Module, train_set: FeatureSequences, val_set: FeatureSequences, out: Path,
               progress: bool, threads: int | None) -> dict[str, float]:
    """Train the state-based VRNN with kp_rl's shared loop (resumes / reuses ``out/model.pt``)."""
    dynamics: KeypointVRNN = model.dynamics
    cfg = model.config
    steps = cfg.train.dynamics_steps
    start = time.perf_counter()

    def loss_fn(batch: dict[str, Tensor], step: int | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return dynamics.loss(batch["features"], batch["action"], batch["reward"], step, steps)

    fit(model, list(dynamics.parameters()), loss_fn, train_set, val_set, out, steps=steps,
        batch_size=cfg.train.dynamics_batch_size, stage="dynamics", progress=progress,
        cuda_graph=cfg.train.cuda_graphs, threads=threads)
    history = read_checkpoint(out / MODEL_FILE)["train_state"]["history"]
    return {"seconds_this_call": round(time.perf_counter() - start, 2), "steps_per_s": steps_per_second(history)}


# ---------------------------------------------------------------------------------------------------- evaluation
def summarise(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of the horizon means; mean / min / max over seeds of the per-step curves."""
    rows = list(per_seed.values())
    summary: dict[str, Any] = {}
    for metric in ("mse", "r2"):
        means = np.array([r[f"{metric}_mean"] for r in rows], dtype=float)
        curves = np.array([r[metric] for r in rows], dtype=float)
        summary[f"{metric}_mean"] = float(np.nanmean(means)) if np.isfinite(means).any() else math.nan
        summary[f"{metric}_std"] = float(np.nanstd(means)) if np.isfinite(means).any() else math.nan
        with warnings.catch_warnings():  # all-nan steps (constant rewards) stay nan
            warnings.simplefilter("ignore", RuntimeWarning)
            summary[f"{metric}_per_step_mean"] = np.nanmean(curves, 0)
            summary[f"{metric}_per_step_min"] = np.nanmin(curves, 0)
            summary[f"{metric}_per_step_max"] = np.nanmax(curves, 0)
    best = [r["best_of_samples"]["r2_mean"] for r in per_seed.values() if "best_of_samples" in r]
    if best:
        summary["r2_best_of_samples_mean"] = float(np.nanmean(best))
    return summary


def jsonable(value: Any) -> Any:
    """numpy -> lists, nan / inf -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ------------------------------------------------------------------------------------------------------ plots
def plot_results(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    methods = list(METHODS) + [BASELINE]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    colours[BASELINE] = "0.5"
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6), squeeze=False, constrained_layout=True)
    for col, task in enumerate(tasks):
        for row, metric in enumerate(("mse", "r2")):
            ax = axes[row, col]
            for method in methods:
                s = results["tasks"][task]["methods"][method]["summary"]
                mean = np.array(s[f"{metric}_per_step_mean"], dtype=float)
                steps = np.arange(1, len(mean) + 1)
                ax.plot(steps, mean, color=colours[method], label=LABELS[method],
                        linestyle="--" if method in ("state", BASELINE) else "-")
                ax.fill_between(steps, np.array(s[f"{metric}_per_step_min"], dtype=float),
                                np.array(s[f"{metric}_per_step_max"], dtype=float), color=colours[method], alpha=0.15)
            ax.set_xlabel("prediction step")
            ax.set_ylabel("reward MSE" if metric == "mse" else "reward R$^2$ (axis cut at -1)")
            if metric == "r2":
                ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.0)
            ax.set_title(f"{task}", fontsize=9)
    axes[0, -1].legend(fontsize=6, loc="best")
    fig.suptitle(f"Open-loop reward prediction on held-out episodes (prior mean; line: mean over seeds "
                 f"{results['config']['seeds']}, band: min-max)", fontsize=9)
    save_figure(fig, out / "reward_per_step.png")

    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(tasks)), 3.2))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        s = [results["tasks"][t]["methods"][method]["summary"] for t in tasks]
        ax.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width,
               [np.nan if x["r2_mean"] is None else x["r2_mean"] for x in s], width,
               yerr=[0 if x["r2_std"] is None else x["r2_std"] for x in s], color=colours[method],
               label=LABELS[method], capsize=2)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(np.arange(len(tasks)), tasks, fontsize=8)
    ax.set_ylabel(f"reward R$^2$, mean over {results['config']['horizon']} steps\n(axis cut at -1)")
    ax.set_ylim(max(-1.0, ax.get_ylim()[0]), 1.0)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("Reward prediction from predicted dynamics: mean ± std over seeds", fontsize=9)
    save_figure(fig, out / "summary.png")


# -------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+",
                        default=["cartpole-swingup", "reacher-easy", "cheetah-run", "walker-walk"])
    parser.add_argument("--frames", type=int, default=7560, help="frame budget per task (episodes derived from it)")
    parser.add_argument("--episodes", type=int, nargs="+", default=None,
                        help="episodes per task (one value or one per task); overrides --frames")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="dynamics seeds")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--ae-steps", type=int, default=250)
    parser.add_argument("--dyn-steps", type=int, default=800)
    parser.add_argument("--horizon", type=int, default=None, help="predicted steps M (default: the preset's)")
    parser.add_argument("--eval-stride", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=512, help="max held-out windows per task")
    parser.add_argument("--video-windows", type=int, default=16, help="held-out windows scored for PSNR / SSIM")
    parser.add_argument("--dyn-threads", type=int, default=1, help="torch threads while training dynamics")
    parser.add_argument("--threads", type=int, default=None, help="torch threads otherwise (default: torch's)")
    parser.add_argument("--data", default="data")
    parser.add_argument("--runs", default="runs/reward_prediction")
    parser.add_argument("--out", default="results/reward_prediction")
    parser.add_argument("--quick", action="store_true", help="tiny everything (smoke test, seconds)")
    args = parser.parse_args()
    wall = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    base = kp_rl.get_preset(args.preset)
    env_kwargs: dict[str, Any] = {}
    max_steps = None
    if args.quick:
        base = kp_rl.get_preset("tiny").replace(train=QUICK_TRAIN)
        env_kwargs, max_steps = {"image_size": base.keypoints.image_size}, 15
        args.ae_steps, args.dyn_steps = min(args.ae_steps, 4), min(args.dyn_steps, 4)
        args.video_windows = min(args.video_windows, 2)
        args.threads = args.threads or 1
        if args.episodes is None:
            args.episodes = [4]
    base = base.replace(train={"steps": args.ae_steps, "seed": 0})
    autoencoder_configs = {"keypoints": base, "cnn": base,
                           "no_kp_losses": base.replace(keypoints={"sparsity_weight": 0.0, "separation_weight": 0.0})}
    observed = base.dynamics.observed_steps
    horizon = args.horizon or base.dynamics.predicted_steps
    results: dict[str, Any] = {
        "experiment": "reward_prediction",
        "notes": ("autoencoders (keypoints, cnn, no_kp_losses) are trained once per task with seed 0; the seeds "
                  "vary the dynamics models only. Reward prediction: open loop from the prior mean after "
                  f"{observed} observed steps, {horizon} predicted steps, held-out episodes; best_of_samples "
                  "picks per window the prior sample with the lowest reward error (oracle selection)."),
        "config": {"tasks": args.tasks, "seeds": args.seeds, "preset": args.preset, "ae_steps": args.ae_steps,
                   "dyn_steps": args.dyn_steps, "frames_per_task": args.frames, "observed": observed,
                   "horizon": horizon, "eval_stride": args.eval_stride, "eval_windows": args.eval_windows,
                   "dyn_threads": args.dyn_threads, "threads": torch.get_num_threads(), "quick": args.quick,
                   "model_config": base.to_dict()},
        "machine": machine(),
        "tasks": {},
    }
    progress = False  # one printed line per stage and run instead of tqdm bars (logs stay readable)
    for task_index, task in enumerate(args.tasks):
        spec = get_spec(task).replace(**env_kwargs)
        if args.episodes:
            episodes = args.episodes[min(task_index, len(args.episodes) - 1)]
        else:
            episodes = max(2, round(args.frames / (spec.max_episode_steps + 1)))
        frames_budget = episodes * ((max_steps or spec.max_episode_steps) + 1)
        root = Path(args.data) / (f"{task}-quick" if args.quick else task)
        runs = Path(args.runs) / task
        tick = time.perf_counter()
        collect(task, root, episodes, seed=0, workers=1 if args.quick else 2, max_steps=max_steps,
                env_kwargs=env_kwargs, progress=progress)
        train_eps = load_split(root, "train", round(frames_budget * 0.9))
        val_eps = load_split(root, "val", max(1, round(frames_budget * 0.1)))
        row: dict[str, Any] = {"episodes": {"train": len(train_eps), "val": len(val_eps),
                                            "train_frames": sum(len(e["image"]) for e in train_eps),
                                            "val_frames": sum(len(e["image"]) for e in val_eps)},
                               "seconds": {"collect_and_load": round(time.perf_counter() - tick, 1)},
                               "methods": {}}
        print(f"[{task}] data: {row['episodes']}", flush=True)

        # -- autoencoders (once per task, seed 0) and their features ------------------------------------------
        autoencoders: dict[str, Path] = {}
        features: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for name, cfg in autoencoder_configs.items():
            tick = time.perf_counter()
            representation = "cnn" if name == "cnn" else "keypoints"
            autoencoders[name] = train_autoencoder(root, runs / f"ae_{name}", cfg, representation, progress=progress)
            model = kp_rl.load(autoencoders[name])
            features[name] = (encode_episodes(model, train_eps), encode_episodes(model, val_eps))
            row["seconds"][f"ae_{name}"] = round(time.perf_counter() - tick, 1)
            print(f"[{task}] autoencoder {name}: ready in {row['seconds'][f'ae_{name}']} s (train + encode)",
                  flush=True)
        states = np.concatenate([e["state"] for e in train_eps])
        state_mean, state_scale = states.mean(0), 3.0 * states.std(0) + 1e-6
        normalise = lambda s: np.clip((s - state_mean) / state_scale, -1.0, 1.0).astype(np.float32)
        features["state"] = ([normalise(e["state"]) for e in train_eps], [normalise(e["state"]) for e in val_eps])

        # -- tracking error of each autoencoder's features (linear probe, held-out frames) ---------------------
        size = train_eps[0]["image"].shape[1]
        coords_train = pixels_to_unit(np.concatenate([e["true_object_pos"] for e in train_eps]), size)
        coords_val = pixels_to_unit(np.concatenate([e["true_object_pos"] for e in val_eps]), size)
        row["tracking"] = {}
        for name in AUTOENCODERS:
            err = tracking_error(np.concatenate(features[name][0]), coords_train, np.concatenate(features[name][1]),
                                 coords_val)
            row["tracking"][name] = {"rmse": err["keypoint_rmse"], "rmse_px": err["keypoint_rmse"] * (size - 1) / 2}
        row["tracking"]["mean_coords"] = {"rmse": err["mean_baseline_rmse"],
                                          "rmse_px": err["mean_baseline_rmse"] * (size - 1) / 2}

        # -- dynamics: one VRNN per (method, seed) -----------------------------------------------------------
        length = base.dynamics.observed_steps + base.dynamics.predicted_steps
        eval_length = observed + horizon
        trained: dict[tuple[str, int], nn.Module] = {}
        for method, (source, dyn_overrides) in METHODS.items():
            train_set = FeatureSequences(with_features(train_eps, features[source][0]), length)
            val_set = FeatureSequences(with_features(val_eps, features[source][1]), length, stride=length)
            eval_set = FeatureSequences(with_features(val_eps, features[source][1]), eval_length, args.eval_stride)
            eval_batch = eval_set.stacked(args.eval_windows)
            per_seed: dict[str, Any] = {}
            for seed in args.seeds:
                run = runs / method / f"seed{seed}"
                overrides = {"train": {"seed": seed, "dynamics_steps": args.dyn_steps}}
                if dyn_overrides:
                    overrides["dynamics"] = dyn_overrides
                seed_everything(seed)
                if method == "state":
                    if (run / MODEL_FILE).exists():
                        model = StateDynamics.load(run / MODEL_FILE)
                    else:
                        model = StateDynamics(base.replace(**overrides), features["state"][0][0].shape[-1],
                                              train_eps[0]["action"].shape[-1], state_mean, state_scale)
                if method == "state":
                    timing = train_vrnn(model, train_set, val_set, run, progress, args.dyn_threads)
                else:
                    tick = time.perf_counter()
                    model = kp_rl.load(train_dynamics(autoencoders[source], root, run, overrides, progress=progress,
                                                      datasets=(train_set, val_set), threads=args.dyn_threads))
                    history = read_checkpoint(run / MODEL_FILE)["train_state"]["history"]
                    timing = {"seconds_this_call": round(time.perf_counter() - tick, 2),
                              "steps_per_s": steps_per_second(history)}
                model.eval()
                torch.manual_seed(seed)  # best-of-S draws alike for fresh and resumed runs
                scores = evaluate_reward_prediction(model.dynamics, eval_batch, observed, base.dynamics.num_samples)
                per_seed[str(seed)] = {**scores["prior_mean"], **timing,
                                       **({"best_of_samples": scores["best_of_samples"]}
                                          if "best_of_samples" in scores else {})}
                trained[(method, seed)] = model
                print(f"[{task}] {method:24s} seed {seed}: {model.config.train.dynamics_steps} steps, "
                      f"{timing['steps_per_s']:.1f} steps/s, "
                      f"{timing['seconds_this_call']:.0f} s | reward MSE {scores['prior_mean']['mse_mean']:.4g}, "
                      f"R2 {scores['prior_mean']['r2_mean']:.3f}", flush=True)
            row["methods"][method] = {"per_seed": per_seed, "summary": summarise(per_seed)}
        row["eval_windows"] = len(eval_batch["reward"])

        # -- trivial baseline: the mean training reward at every step ---------------------------------------
        mean_reward = float(np.concatenate([e["reward"][1:] for e in train_eps]).mean())
        truth = eval_batch["reward"][:, observed:]
        baseline = reward_prediction_error(torch.full_like(truth, mean_reward), truth)
        row["methods"][BASELINE] = {"value": mean_reward, "per_seed": {str(s): baseline for s in args.seeds},
                                    "summary": summarise({str(s): baseline for s in args.seeds})}

        # -- video prediction: truth | Struct-VRNN x2 | CNN-VRNN x2 (first seed), and PSNR / SSIM ------------
        tick = time.perf_counter()
        video_eps = [e for e in val_eps if len(e["image"]) >= eval_length]
        image_windows = [(e["image"][s:s + eval_length], e["action"][s:s + eval_length])
                         for e in video_eps for s in range(0, len(e["image"]) - eval_length + 1, eval_length)]
        image_windows = image_windows[:args.video_windows]
        images = np.stack([w[0] for w in image_windows])
        actions = np.stack([w[1] for w in image_windows])
        episode = video_eps[0]
        start = min(len(episode["image"]) - eval_length, len(episode["image"]) // 3)
        shown = {"truth": episode["image"][start:start + eval_length]}
        row["video"] = {}
        seed0 = args.seeds[0]
        for method, label in (("struct", "Struct-VRNN"), ("cnn", "CNN-VRNN")):
            model = trained[(method, seed0)]
            torch.manual_seed(seed0)
            one = predict_frames(model, episode["image"][None, start:start + observed],
                                 episode["action"][None, start:start + eval_length], num_samples=2)
            shown.update({f"{label} sample {s + 1}": one["frames"][s, 0] for s in range(2)})
            many = predict_frames(model, images[:, :observed], actions, num_samples=2)
            row["video"][method] = video_metrics(many["frames"], images)
        write_comparison(shown, out / f"video_{task}", observed,
                         title=f"{task}: held-out episode, {observed} observed + {horizon} predicted steps "
                               f"(red: open-loop prediction, seed {seed0})")
        row["video"]["windows"] = len(images)
        row["seconds"]["video"] = round(time.perf_counter() - tick, 1)
        results["tasks"][task] = row

    results["seconds"] = round(time.perf_counter() - wall, 1)
    results = jsonable(results)
    write_json(out / "results.json", results)

    methods = list(METHODS) + [BASELINE]
    print(f"\nreward prediction over {horizon} open-loop steps after {observed} observed (held-out episodes; "
          f"mean ± std over seeds {args.seeds})")
    print(f"{'task':18s} {'method':24s} {'reward MSE':>20s} {'R2':>16s} {'R2 best-of-S':>13s}")
    fmt = lambda m, s: "n/a" if m is None else f"{m:.4g} ± {s or 0:.2g}"
    for task, row in results["tasks"].items():
        for method in methods:
            s = row["methods"][method]["summary"]
            best = s.get("r2_best_of_samples_mean")
            print(f"{task:18s} {method:24s} {fmt(s['mse_mean'], s['mse_std']):>20s} "
                  f"{fmt(s['r2_mean'], s['r2_std']):>16s} "
                  f"{'' if best is None else f'{best:.3f}':>13s}")
        tracking = ", ".join(f"{k} {v['rmse_px']:.2f}" for k, v in row["tracking"].items())
        print(f"{task:18s} tracking RMSE (px): {tracking}")
    plot_results(results, out)
    print(f"wrote {out}/results.json, reward_per_step.png, summary.png, video_<task>.gif/png "
          f"({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
