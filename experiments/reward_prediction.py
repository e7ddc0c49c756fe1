"""Structured vs unstructured dynamics: how well does each predict future rewards from a few observed frames?

The paper's central comparison (Struct-VRNN vs CNN-VRNN), with our reward head, under a protocol a reviewer
accepts. Per task (random-policy data):

* data: a training dataset (train/val split by episode; val drives early stopping) and a separate test dataset
  of >= 20 episodes collected with another seed, used only for the figures;
* autoencoders, each with ``--ae-seeds`` seeds, trained until their validation loss plateaus (early stopping,
  ``train.patience``; a spec's ``lr_reductions`` first lower the learning rate at a plateau): ``keypoints``,
  ``cnn`` (the unstructured baseline), ``no_kp_losses`` (keypoints without the sparsity and separation losses);
* VRNNs, ``--seeds`` per method (seed s runs on autoencoder seed s mod ae-seeds), to a plateau as well:
  ``struct``, ``cnn`` (same VRNN class and sizes), the ablations ``struct_no_kp_losses``, ``struct_deterministic``,
  ``struct_no_best_of_many``, ``struct_stop_prior_grad`` (the reference's stop-gradient into the prior at predicted
  steps) with ``--ablation-seeds``, and ``state`` (the same VRNN on the true low-dimensional state: the upper
  reference); ``mean_reward`` (the training mean at every step) is the trivial baseline.

Evaluation on non-overlapping test windows (N observed + M predicted steps): reward MSE and R^2 per predicted
step from the prior-mean rollout (the headline), from the mean of S sampled rollouts, best-of-S (oracle-selected,
labelled), and from a reward probe fitted afterwards on the frozen VRNN's beliefs (the paper's protocol).
Struct minus CNN as paired differences (seed by seed) with 95% bootstrap CIs, per task and pooled over tasks.

A progress bar counts the cells; every cell's training logs to TensorBoard (its folder under --runs) and
checkpoints. Every finished cell (an autoencoder, a VRNN) writes results/reward_prediction/cells/<task>/<cell>.json, which is
committed: a run on another machine skips it. Checkpoints go to --runs (not committed); a VRNN cell whose
autoencoder checkpoint is missing retrains it (same seed, same data: the same model on the CPU). An autoencoder
cell can outlast a session: ``--stash`` copies the unfinished ones' checkpoints to <out>/partial (commit it), and
a run on another machine resumes them from there.

    python experiments/reward_prediction.py --spec cpu [--workers 2] [--tasks ...] [--max-hours H]
    python experiments/reward_prediction.py --spec cpu --stash      # before a session ends: then commit <out>
    python experiments/reward_prediction.py --spec quick          # a smoke test in seconds (tests)

Writes results/reward_prediction/{results.json, README.md, reward_per_step.png} (another spec than cpu:
results/reward_prediction/<spec>/); each cell's JSON holds its validation curve.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import fcntl
import multiprocessing as mp
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import kp_rl
from kp_rl.bench import machine
from kp_rl.config import Config
from kp_rl.data import FeatureSequences, collect, encode_episodes, episode_files, load_episode, split_episodes
from kp_rl.dynamics import KeypointVRNN
from kp_rl.envs import pixels_to_unit
from kp_rl.evaluate import evaluate_reward_prediction
from kp_rl.experiment import bootstrap_ci
from kp_rl.files import read_json, save_figure, write_bytes, write_json
from kp_rl.metrics import reward_prediction_error, tracking_error
from kp_rl.model import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, read_checkpoint, resolve_device
from kp_rl.report import experiment_readme, markdown_table
from kp_rl.train import MODEL_FILE, fit, seed_everything, train_autoencoder, train_dynamics
from kp_rl.video import predict_frames, video_metrics

KEYS = ("image", "action", "reward", "state", "true_object_pos")
AUTOENCODERS = {"keypoints": {}, "cnn": {}, "no_kp_losses": {"keypoints": {"sparsity_weight": 0.0,
                                                                          "separation_weight": 0.0}}}
# method -> (what it runs on, dynamics overrides, ablation?)
METHODS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "struct": ("keypoints", {}, False),
    "cnn": ("cnn", {}, False),
    "state": ("state", {}, False),
    "struct_no_kp_losses": ("no_kp_losses", {}, True),
    "struct_deterministic": ("keypoints", {"stochastic": False}, True),
    "struct_no_best_of_many": ("keypoints", {"best_of_many": False}, True),
    "struct_stop_prior_grad": ("keypoints", {"stop_prior_gradient": True}, True),
}
LABELS = {"struct": "Struct-VRNN", "cnn": "CNN-VRNN", "state": "state VRNN (upper reference)",
          "struct_no_kp_losses": "Struct-VRNN, no keypoint losses", "struct_deterministic": "Struct-VRNN, deterministic",
          "struct_no_best_of_many": "Struct-VRNN, no best-of-many",
          "struct_stop_prior_grad": "Struct-VRNN, prior gradient stopped", "mean_reward": "mean training reward"}
SPECS: dict[str, dict[str, Any]] = {
    # 2 CPU cores: two autoencoders side by side on one thread each, channels-last and bf16 autocast (this
    # machine's EPYC computes bf16 natively: 3.8 steps/s each beside another one, 1.25-1.4 for one fp32 run on
    # both cores before; validation losses alike, results/reward_prediction/README.md); VRNNs two at a time on one
    # thread each (a state VRNN cell: 5-6.5 min). The first autoencoder's validation loss still fell ~10% per 250
    # steps at 1,250 steps, so the budget is 8,000 steps (<= 35 min), ended earlier by the plateau rule.
    "cpu": {"tasks": ["cartpole-swingup", "walker-walk"], "preset": "cpu", "ae_seeds": 3, "seeds": 5,
            "ablation_seeds": 3, "train_episodes": {"cartpole-swingup": 100, "walker-walk": 30}, "test_episodes": 20,
            "ae_steps": 8000, "ae_threads": 1, "ae_cpu_amp": True, "ae_eval_every": 250, "dyn_steps": 12000,
            "dyn_eval_every": 500,
            "patience": 6,
            "eval_batches": 16, "ramp_steps": 3000, "max_steps": None, "image_size": None, "readout_steps": 4000},
    # one H200: all six tasks with the paper preset, many cells at a time
    "gpu": {"tasks": ["cartpole-swingup", "reacher-easy", "cheetah-run", "walker-walk", "finger-spin",
                      "ball_in_cup-catch"], "preset": "paper", "ae_seeds": 3, "seeds": 5, "ablation_seeds": 3,
            "train_episodes": {}, "default_train_frames": 40_000, "test_episodes": 20, "ae_steps": 20_000,
            "ae_eval_every": 500, "ae_threads": 1, "dyn_steps": 20_000, "dyn_eval_every": 500, "patience": 6,
            "lr_reductions": 2,
            "eval_batches": 16,
            "ramp_steps": 5000,
            "max_steps": None, "image_size": None, "readout_steps": 4000},
    # the smoke test: tiny sizes, seconds
    "quick": {"tasks": ["cartpole-swingup"], "preset": "tiny", "ae_seeds": 1, "seeds": 2, "ablation_seeds": 1,
              "train_episodes": {}, "default_train_frames": 80, "test_episodes": 2, "ae_steps": 6,
              "ae_eval_every": 3, "ae_threads": 1, "dyn_steps": 6, "dyn_eval_every": 3, "patience": 2, "eval_batches": 1,
              "lr_reductions": 1,
              "ramp_steps": 4,
              "max_steps": 19, "image_size": 32, "readout_steps": 20},
}

# does the cpu autoencoders' budget limit the reading? cpu_ae8k: cartpole's seed-0 autoencoders at the cpu
# spec's 8,000 steps; cpu_ae16k: the same two continued to 16,000 (copy runs/reward_prediction/cpu/cartpole-
# swingup/ae_{keypoints,cnn}_seed0 into runs/reward_prediction/cpu_ae{8,16}k/cartpole-swingup/ first, else they
# train from scratch); the cpu spec's data; VRNN seeds 0-3 of struct and cnn, all on autoencoder seed 0, so
# every VRNN cell of the two specs pairs up (run both with --methods struct cnn)
SPECS["cpu_ae8k"] = {**SPECS["cpu"], "tasks": ["cartpole-swingup"], "train_episodes": {"cartpole-swingup": 100},
                     "data": "cpu", "ae_seeds": 1, "seeds": 4, "ablation_seeds": 0}
SPECS["cpu_ae16k"] = {**SPECS["cpu_ae8k"], "ae_steps": 16_000, "compare_with": "cpu_ae8k"}
# the benchmark's other four tasks on 2 cores, one seed each: the state VRNN (does the recipe reach R^2 0.8 on every
# task?) and Struct-VRNN seed 0, shipped as the pretrained:<task> bundles (--methods struct state
# --export-pretrained); ~15k random-policy frames per task, as cartpole's and walker's training sets; bf16 autocast
# only on a CPU that computes it natively (elsewhere it slows training)
SPECS["cpu_tasks"] = {**SPECS["cpu"], "tasks": ["reacher-easy", "cheetah-run", "finger-spin", "ball_in_cup-catch"],
                      "ae_seeds": 1, "seeds": 1, "ablation_seeds": 0, "train_episodes": {},
                      "default_train_frames": 15_000, "ae_cpu_amp": None}
# reacher-easy's target stands still through an episode, so with the paper's reference frame (the sequence's own
# first frame) the decoder copies it and no keypoint carries it (cpu_tasks: Struct-VRNN R^2 below the mean reward);
# cpu_tasks_other reconstructs each sequence from another episode's first frame (keypoints.reference: other, as the
# online agents), on cpu_tasks' data: run with --methods struct
SPECS["cpu_tasks_other"] = {**SPECS["cpu_tasks"], "tasks": ["reacher-easy"], "data": "cpu_tasks",
                            "keypoints": {"reference": "other"}}
# the cpu spec's 8,000-step autoencoders had not plateaued (validation loss still -10% to -55% over their last
# quarter): cpu_plateau continues each from its committed 8,000-step weights (a fresh optimiser) until the plateau
# rule ends it (at most 16,000 more steps), then trains every VRNN again on them; bf16 autocast only on a CPU that
# computes it natively. Its cells count steps from 0 (the 8,000 included) and carry the whole validation curve.
# The cells that do not depend on the autoencoders (state VRNNs, state read-out, mean reward) are copied from cpu.
# At a constant lr the validation loss swings 5-10% between evaluations (the weights oscillate), so a 1% plateau
# rule alone stopped runs whose loss still fell 10% per quarter: each plateau first lowers the lr (x0.3, twice).
SPECS["cpu_plateau"] = {**SPECS["cpu"], "data": "cpu", "ae_steps": 16_000, "ae_cpu_amp": None, "warm_start": "cpu",
                        "lr_reductions": 2}
SPECS["quick_warm"] = {**SPECS["quick"], "data": "quick", "ae_steps": 4, "warm_start": "quick"}  # its test


# ------------------------------------------------------------------------------------------------------ data
def datasets(task: str, spec: dict[str, Any], data: Path, workers: int = 1) -> tuple[Path, Path]:
    """The task's training dataset (seed 0) and its test dataset (seed 1), collected once (resumable) by
    ``workers`` processes."""
    env_kwargs = {"image_size": spec["image_size"]} if spec["image_size"] else {}
    episode_frames = (spec["max_steps"] or kp_rl.envs.get_spec(task).max_episode_steps) + 1
    train = spec["train_episodes"].get(task) or max(4, round(spec["default_train_frames"] / episode_frames))
    data_name = spec.get("data", spec["name"])  # a spec may reuse another's datasets
    suffix = f"-{data_name}" if data_name != "cpu" else ""
    roots = data / f"{task}{suffix}", data / f"{task}{suffix}-test"
    for root, episodes, seed in ((roots[0], train, 0), (roots[1], spec["test_episodes"], 1)):
        collect(task, root, episodes, seed=seed, workers=workers, max_steps=spec["max_steps"], env_kwargs=env_kwargs,
                progress=False)
    return roots


def episodes(root: Path, split: str) -> list[dict[str, np.ndarray]]:
    return [load_episode(path, keys=KEYS) for path in split_episodes(episode_files(root), split, 0.1)]


def with_features(eps: list[dict[str, np.ndarray]], features: list[np.ndarray]) -> list[dict[str, Any]]:
    return [{**e, "features": f} for e, f in zip(eps, features)]


def state_features(train: list[dict[str, np.ndarray]]):
    """The true state, z-scored with the training statistics / 3 and clipped to [-1, 1] (the tanh decoder's range)."""
    states = np.concatenate([e["state"] for e in train])
    mean, scale = states.mean(0), 3.0 * states.std(0) + 1e-6
    return mean, scale, lambda eps: [np.clip((e["state"] - mean) / scale, -1, 1).astype(np.float32) for e in eps]


# ------------------------------------------------------------------------------------------------- the cells
def config_for(spec: dict[str, Any], seed: int, dynamics: dict[str, Any] | None = None,
               autoencoder: dict[str, Any] | None = None) -> Config:
    base = kp_rl.get_preset(spec["preset"])
    return base.replace(
        train={"seed": seed, "steps": spec["ae_steps"], "dynamics_steps": spec["dyn_steps"], "patience": spec["patience"],
               "lr_reductions": spec.get("lr_reductions", 0),
               "eval_every": spec["ae_eval_every"], "checkpoint_every": spec["ae_eval_every"],
               "eval_batches": spec["eval_batches"]},
        dynamics={"sampling_ramp_steps": spec["ramp_steps"], **(dynamics or {})}, **(autoencoder or {}))


def autoencoder_config(spec: dict[str, Any], kind: str, seed: int) -> Config:
    """An autoencoder cell's config: the spec's keypoint settings (if any) under the method's own overrides."""
    overrides = AUTOENCODERS[kind]
    if kind != "cnn" and "keypoints" in spec:
        overrides = {**overrides, "keypoints": {**spec["keypoints"], **overrides.get("keypoints", {})}}
    return config_for(spec, seed, autoencoder=overrides).replace(train={"cpu_amp": spec.get("ae_cpu_amp", False)})


def autoencoder_cell(task: str, kind: str, seed: int, spec: dict[str, Any], roots: tuple[Path, Path],
                     runs: Path) -> dict[str, Any]:
    """Train one autoencoder to its plateau; its held-out tracking error; its features cached for the VRNNs."""
    threads = spec["ae_threads"]
    torch.set_num_threads(threads)
    tick = time.perf_counter()
    run = runs / task / f"ae_{kind}_seed{seed}"
    config = autoencoder_config(spec, kind, seed)
    stashed = Path(spec["out"]) / "partial" / task / run.name
    if not (run / MODEL_FILE).exists() and stashed.exists():  # begun on another machine
        for file in stashed.iterdir():
            write_bytes(run / file.name, file.read_bytes())
    warm_steps, warm_curve = warm_start(spec, task, run, config)
    path = train_autoencoder(roots[0], run, config, "cnn" if kind == "cnn" else "keypoints", progress=False,
                             threads=threads)
    track, model = encode_all(path, run, roots)
    size = model.image_size
    history = read_json(run / "history.json")
    return {"cell": f"ae_{kind}_seed{seed}", "task": task, "kind": kind, "seed": seed,
            "steps": warm_steps + (history["train"][-1]["step"] if history["train"] else 0),
            "stopped": history.get("stopped"), "warm_start_steps": warm_steps,
            "lr_reductions": [(warm_steps + r["step"], r["lr"]) for r in history.get("lr_reductions", [])],
            "val_loss": warm_curve + [(warm_steps + row["step"], row["loss"]) for row in history["val"]],
            "parameters": sum(p.numel() for p in model.autoencoder.parameters()),
            "tracking_rmse_px": track["keypoint_rmse"] * (size - 1) / 2,
            "mean_position_rmse_px": track["mean_baseline_rmse"] * (size - 1) / 2,
            "seconds": round(time.perf_counter() - tick, 1)}


def spec_out(name: str, root: Path = Path("results/reward_prediction")) -> Path:
    """Where a spec's results go: ``root`` for the cpu spec, ``root/<name>`` for the others."""
    return root if name == "cpu" else root / name


def warm_start(spec: dict[str, Any], task: str, run: Path, config: Config) -> tuple[int, list[tuple[int, float]]]:
    """For a spec with ``warm_start``: the steps and validation curve of the other spec's finished autoencoder cell
    this one continues, whose committed weights become the run's start (under this spec's config, fresh optimiser)
    when the run has no checkpoint yet. Otherwise ``(0, [])``."""
    if not spec.get("warm_start"):
        return 0, []
    source = spec_out(spec["warm_start"], Path(spec["out"]).parent)
    cell = read_json(cell_path(source, task, run.name))
    if not (run / MODEL_FILE).exists():
        model = kp_rl.load(source / "models" / task / f"{run.name}.pt")
        model.config = config
        model.save(run / MODEL_FILE)
    return cell["steps"], [tuple(row) for row in cell["val_loss"]]


def stash(spec: dict[str, Any], runs: Path, unfinished: list[tuple[str, str]]) -> list[Path]:
    """Copy the checkpoints of unfinished autoencoder cells ``(task, name)`` that have trained to ``<out>/partial``
    (to commit), so that a run on another machine resumes them."""
    stashed = []
    for task, name in unfinished:
        run, dest = runs / task / name, Path(spec["out"]) / "partial" / task / name
        checkpoint = read_checkpoint(run / MODEL_FILE) if (run / MODEL_FILE).exists() else None
        if checkpoint is None or not checkpoint["train_state"]:
            continue
        for file in (MODEL_FILE, "history.json", "run.json"):
            if (run / file).exists():
                write_bytes(dest / file, (run / file).read_bytes())
        stashed.append(dest)
    return stashed


def encode_all(checkpoint: Path, run: Path, roots: tuple[Path, Path]) -> tuple[dict[str, float], Any]:
    """Every split's features through a trained autoencoder, cached in ``run/features.npz`` for the VRNNs; its
    held-out tracking error."""
    model = kp_rl.load(checkpoint, device="auto")
    splits = {"train": episodes(roots[0], "train"), "val": episodes(roots[0], "val"), "test": episodes(roots[1], "all")}
    features = {name: encode_episodes(model, eps) for name, eps in splits.items()}
    arrays = {f"{name}_{i}": f for name, fs in features.items() for i, f in enumerate(fs)}
    write_bytes(run / "features.npz", lambda handle: np.savez(handle, **arrays))  # atomic: VRNN cells read it
    size = model.image_size
    coords = {name: pixels_to_unit(np.concatenate([e["true_object_pos"] for e in eps]), size)
              for name, eps in splits.items()}
    return tracking_error(np.concatenate(features["train"]), coords["train"], np.concatenate(features["test"]),
                          coords["test"]), model


def commit_weights(checkpoint: Path, dest: Path) -> None:
    """A finished model's weights without optimiser state (a few hundred KB), committed beside the cells so that a
    fresh machine re-encodes the data instead of retraining the autoencoder (and ships Struct-VRNN seed 0)."""
    kp_rl.load(checkpoint).save(dest)


def cached_features(run: Path) -> dict[str, list[np.ndarray]]:
    with np.load(run / "features.npz") as data:
        out: dict[str, list[np.ndarray]] = {}
        for key in sorted(data.files, key=lambda k: (k.rsplit("_", 1)[0], int(k.rsplit("_", 1)[1]))):
            out.setdefault(key.rsplit("_", 1)[0], []).append(data[key])
    return out


def vrnn_cell(task: str, method: str, seed: int, spec: dict[str, Any], roots: tuple[Path, Path],
              runs: Path) -> dict[str, Any]:
    """Train one VRNN + reward head to its plateau and evaluate it on the test windows."""
    torch.set_num_threads(1)
    tick = time.perf_counter()
    source, overrides, _ = METHODS[method]
    splits = {"train": episodes(roots[0], "train"), "val": episodes(roots[0], "val"), "test": episodes(roots[1], "all")}
    config = config_for(spec, seed, dynamics=overrides)
    config = config.replace(train={"eval_every": spec["dyn_eval_every"], "checkpoint_every": spec["dyn_eval_every"]})
    run = runs / task / method / f"seed{seed}"
    length = config.dynamics.sequence_length
    if source == "state":
        mean, scale, normalise = state_features(splits["train"])
        features = {name: normalise(eps) for name, eps in splits.items()}
    else:
        ae_seed = seed % spec["ae_seeds"]
        ae_run = runs / task / f"ae_{source}_seed{ae_seed}"
        committed = Path(spec["models_dir"]) / task / f"ae_{source}_seed{ae_seed}.pt"
        ae_run.mkdir(parents=True, exist_ok=True)
        with open(ae_run / ".lock", "w") as lock:  # the VRNN cells on one autoencoder run side by side
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (ae_run / "features.npz").exists() and committed.exists():  # a fresh machine: committed weights
                write_bytes(ae_run / MODEL_FILE, committed.read_bytes())
                encode_all(ae_run / MODEL_FILE, ae_run, roots)
            elif not (ae_run / "features.npz").exists():  # no weights either: same seed and data, same model
                autoencoder_cell(task, source, ae_seed, spec, roots, runs)
        features = cached_features(ae_run)
    sets = {name: FeatureSequences(with_features(eps, features[name]), length,
                                   stride=1 if name == "train" else length) for name, eps in splits.items()}
    seed_everything(seed)
    if source == "state":
        model = StateDynamics.load(run / MODEL_FILE) if (run / MODEL_FILE).exists() else StateDynamics(
            config, features["train"][0].shape[-1], splits["train"][0]["action"].shape[-1], mean, scale)
        if not (run / MODEL_FILE).exists():
            model.dynamics.set_reward_normalisation(*sets["train"].reward_statistics())
        train_state_vrnn(model.to(resolve_device("auto")), sets["train"], sets["val"], run)  # a GPU if there is one
        model = StateDynamics.load(run / MODEL_FILE)
    else:
        model = kp_rl.load(train_dynamics(ae_run, roots[0], run, config_overrides(config), progress=False,
                                          datasets=(sets["train"], sets["val"]), threads=1))
    dynamics = model.dynamics.eval()
    observed = config.dynamics.observed_steps
    torch.manual_seed(seed)  # the same samples for a fresh and a resumed cell
    scores = evaluate_reward_prediction(dynamics, sets["test"].stacked(len(sets["test"])), observed,
                                        config.dynamics.num_samples, probe_windows=sets["train"].stacked(2048))
    video = None
    if method in ("struct", "cnn"):  # video prediction from the same model: PSNR / SSIM per step (truth frames)
        length_m = observed + config.dynamics.predicted_steps
        windows = [(e["image"][s:s + length_m], e["action"][s:s + length_m]) for e in splits["test"]
                   for s in range(0, len(e["image"]) - length_m + 1, length_m)][:spec.get("video_windows", 32)]
        torch.manual_seed(seed)
        frames = predict_frames(model, np.stack([w[0][:observed] for w in windows]),
                                np.stack([w[1] for w in windows]), num_samples=3)["frames"]
        video = video_metrics(frames, np.stack([w[0] for w in windows]))
        video = {k: (v[observed:] if isinstance(v, np.ndarray) else v) for k, v in video.items()}  # predicted steps
    history = read_json(run / "history.json")
    return {"cell": f"{method}_seed{seed}", "task": task, "method": method, "seed": seed, "video": jsonable(video),
            "autoencoder_seed": None if source == "state" else seed % spec["ae_seeds"],
            "steps": history["train"][-1]["step"] if history["train"] else 0, "stopped": history.get("stopped"),
            "lr_reductions": [(r["step"], r["lr"]) for r in history.get("lr_reductions", [])],
            "val_loss": [(row["step"], row["loss"]) for row in history["val"]],
            "parameters": sum(p.numel() for p in dynamics.parameters()), "test_windows": len(sets["test"]),
            "reward_mean": float(dynamics.reward_mean), "reward_scale": float(dynamics.reward_scale),
            "scores": jsonable(scores), "seconds": round(time.perf_counter() - tick, 1)}


def config_overrides(config: Config) -> dict[str, dict[str, Any]]:
    """The train / dynamics sections of ``config`` as train_dynamics overrides."""
    data = config.to_dict()
    return {"train": data["train"], "dynamics": data["dynamics"]}


def baseline_cell(task: str, roots: tuple[Path, Path], observed: int, horizon: int) -> dict[str, Any]:
    """The mean training reward at every predicted step of the test windows."""
    train, test = episodes(roots[0], "train"), episodes(roots[1], "all")
    mean = float(np.concatenate([e["reward"][1:] for e in train]).mean())
    length = observed + horizon
    truth = np.stack([e["reward"][s + observed:s + length] for e in test
                      for s in range(0, len(e["reward"]) - length + 1, length)])
    states = np.concatenate([e["state"] for e in train])
    rewards = np.concatenate([e["reward"][1:] for e in train])
    return {"cell": "mean_reward", "task": task, "value": mean,
            "scores": jsonable({"prior_mean": reward_prediction_error(np.full_like(truth, mean), truth)}),
            # what the data look like: how much of the state VRNN's normalised input is clipped, how often the
            # random policy earns a reward worth the name
            "data": {"state_clipped_fraction": float(np.mean(np.abs(
                        (states - states.mean(0)) / (3.0 * states.std(0) + 1e-6)) > 1)),
                     "reward_std": float(rewards.std()), "rewards_above_0.1_fraction": float(np.mean(rewards > 0.1))}}


def readout_cell(task: str, roots: tuple[Path, Path], steps: int = 4000, seed: int = 0) -> dict[str, Any]:
    """The reward read from the true state, teacher-forced (no prediction): an MLP (2 x 256) from the state, the
    previous state and the action taken to the reward, fitted on the training split; R^2 on the test episodes.
    The ceiling of a reward head on this data, whatever predicts the state; also fitted on fractions of the
    training episodes (does more random-policy data raise it?)."""
    torch.manual_seed(seed)
    train, test = episodes(roots[0], "train"), episodes(roots[1], "all")
    _, _, normalise = state_features(train)

    def pairs(eps: list[dict[str, np.ndarray]]) -> tuple[Tensor, Tensor]:
        x = [np.concatenate([s[1:], s[:-1], e["action"][:len(s) - 1]], 1) for e, s in zip(eps, normalise(eps))]
        return torch.as_tensor(np.concatenate(x)), torch.as_tensor(np.concatenate([e["reward"][1:] for e in eps]))

    def r2(net: nn.Module, x: Tensor, y: Tensor) -> float | None:
        if not y.var() > 0:  # no reward in these episodes (finger-spin's random policy): R² is undefined
            return None
        with torch.no_grad():
            return float(1 - ((net(x).squeeze(-1) - y) ** 2).mean() / y.var())

    x_test, y_test = pairs(test)
    row: dict[str, Any] = {"cell": "state_readout", "task": task, "steps": steps, "by_episodes": {}}
    for fraction in (1 / 3, 2 / 3, 1.0):
        x, y = pairs(train[:max(1, round(fraction * len(train)))])
        net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.ELU(), nn.Linear(256, 256), nn.ELU(), nn.Linear(256, 1))
        optimiser = torch.optim.Adam(net.parameters(), 1e-3)
        for _ in range(steps):
            i = torch.randint(len(x), (256,))
            loss = ((net(x[i]).squeeze(-1) - y[i]) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        row["by_episodes"][max(1, round(fraction * len(train)))] = {"train_r2": r2(net, x, y),
                                                                     "test_r2": r2(net, x_test, y_test)}
    row["test_r2"] = row["by_episodes"][len(train)]["test_r2"]
    return row


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
        checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "representation": "state",
                      "config": self.config.to_dict(), "state_dim": self.dynamics.feature_dim,
                      "action_dim": self.dynamics.action_dim, "state_dict": self.state_dict(),
                      "train_state": train_state}
        write_bytes(Path(path), lambda handle: torch.save(checkpoint, handle))

    @classmethod
    def load(cls, path: Path) -> "StateDynamics":
        data = read_checkpoint(path)
        model = cls(Config.from_dict(data["config"]), data["state_dim"], data["action_dim"])
        model.load_state_dict(data["state_dict"])
        return model.eval()


def train_state_vrnn(model: StateDynamics, train_set: FeatureSequences, val_set: FeatureSequences, out: Path) -> None:
    """The state VRNN through kp_rl's training loop (resumes ``out/model.pt``; early stopping as configured)."""
    dynamics, steps = model.dynamics, model.config.train.dynamics_steps

    def loss_fn(batch: dict[str, Tensor], step: int | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return dynamics.loss(batch["features"], batch["action"], batch["reward"], step, steps)

    fit(model, list(dynamics.parameters()), loss_fn, train_set, val_set, out, steps=steps,
        batch_size=model.config.train.dynamics_batch_size, stage="dynamics", progress=False, threads=1)


def jsonable(value: Any) -> Any:
    """numpy -> lists, nan / inf -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, Tensor)):
        return jsonable(np.asarray(value).tolist())
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# ------------------------------------------------------------------------------------------------ statistics
def summarise(cells: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """``summary[task][method]`` (r2_mean, r2_ci, mse_mean, seeds, ...) and ``summary["struct_minus_cnn"]``."""
    summary: dict[str, Any] = {}
    diffs: dict[str, np.ndarray] = {}
    for task, methods in cells.items():
        summary[task] = {}
        for method, rows in methods.items():
            r2 = np.array([np.nan if r["scores"]["prior_mean"]["r2_mean"] is None else r["scores"]["prior_mean"]["r2_mean"]
                           for r in rows])
            mse = np.array([r["scores"]["prior_mean"]["mse_mean"] for r in rows])
            entry = {"r2_mean": float(np.nanmean(r2)), "r2_std": float(np.std(r2, ddof=1)) if len(r2) > 1 else None,
                     "r2_ci": bootstrap_ci([r2]) if len(r2) > 1 else None, "mse_mean": float(mse.mean()),
                     "seeds": [r.get("seed") for r in rows],
                     "r2_per_step": np.nanmean([r["scores"]["prior_mean"]["r2"] for r in rows], 0).tolist()}
            for other in ("sample_mean", "probe", "best_of_samples"):
                if all(other in r["scores"] for r in rows):
                    entry[f"r2_{other}_mean"] = float(np.nanmean([r["scores"][other]["r2_mean"] for r in rows]))
            if rows and rows[0].get("video"):
                for metric in ("psnr", "ssim"):
                    entry[f"{metric}_mean"] = float(np.mean([np.mean(r["video"][f"{metric}_first_sample"])
                                                             for r in rows]))
            if rows and "steps" in rows[0]:
                entry["steps"] = [r["steps"] for r in rows]
                entry["parameters"] = rows[0]["parameters"]
            summary[task][method] = entry
        struct = {r["seed"]: r for r in methods.get("struct", [])}
        cnn = {r["seed"]: r for r in methods.get("cnn", [])}
        paired = sorted(set(struct) & set(cnn))
        if len(paired) >= 2:
            diffs[task] = np.array([struct[s]["scores"]["prior_mean"]["r2_mean"] - cnn[s]["scores"]["prior_mean"]["r2_mean"]
                                    for s in paired])
    summary["struct_minus_cnn"] = {task: {"r2_diff": float(d.mean()), "r2_diff_ci": bootstrap_ci([d]),
                                          "seeds": len(d)} for task, d in diffs.items()}
    if len(diffs) > 1:
        summary["struct_minus_cnn"]["pooled"] = {"r2_diff": float(np.mean([d.mean() for d in diffs.values()])),
                                                 "r2_diff_ci": bootstrap_ci(list(diffs.values())),
                                                 "tasks": sorted(diffs)}
    return summary


def _headline(cell: dict[str, Any]) -> float:
    """An autoencoder cell's tracking RMSE (px), a VRNN cell's test reward R² (prior mean)."""
    return cell["tracking_rmse_px"] if "tracking_rmse_px" in cell else cell["scores"]["prior_mean"]["r2_mean"]


def compare_specs(base: Path, out: Path, tasks: list[str]) -> dict[str, Any]:
    """This spec's cells against the same cells of another spec's folder ``base`` (same seeds, same data): per
    task the pairs (tracking in px for autoencoders, test reward R² for VRNNs) and per VRNN method the mean
    paired difference (this - base) with its 95% bootstrap CI."""
    compared: dict[str, Any] = {}
    for task in tasks:
        pairs, by_method = {}, {}
        for path in sorted((out / "cells" / task).glob("*_seed*.json")):
            if not (base / "cells" / task / path.name).exists():
                continue
            ours, theirs = read_json(path), read_json(base / "cells" / task / path.name)
            pairs[path.stem] = {"base": _headline(theirs), "this": _headline(ours),
                                "steps": [theirs["steps"], ours["steps"]]}
            if "method" in ours:  # a VRNN cell
                by_method.setdefault(ours["method"], []).append(_headline(ours) - _headline(theirs))
        methods = {m: {"r2_diff": float(np.mean(d)), "r2_diff_ci": bootstrap_ci([np.array(d)]) if len(d) > 1 else None,
                       "seeds": len(d)} for m, d in by_method.items()}
        if pairs:
            compared[task] = {"base": base.name, "cells": pairs, "methods": methods}
    return compared


# ---------------------------------------------------------------------------------------------- the report
def late_change(curve: list[tuple[int, float]]) -> float:
    """The relative change of a validation curve over its last quarter: best of the last three evaluations
    against the best of the three before the quarter began (about 0: a plateau)."""
    steps, losses = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
    start = int(np.searchsorted(steps, 0.75 * steps[-1], side="right"))
    return float(losses[-3:].min() / losses[max(start - 3, 0):max(start, 1)].min() - 1)


def report(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, tasks = results["summary"], [t for t in results["summary"] if t != "struct_minus_cnn"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for i, (method, entry) in enumerate(summary[task].items()):
            steps = np.arange(1, len(entry["r2_per_step"]) + 1)
            ax.plot(steps, np.array(entry["r2_per_step"], float), color=f"C{i}", label=LABELS[method],
                    linestyle="--" if method in ("state", "mean_reward") else "-")
        ax.set_ylim(-1, 1)
        ax.set_xlabel("predicted step")
        ax.set_ylabel("reward R$^2$ (prior mean; mean over seeds)")
        ax.set_title(task, fontsize=9)
    axes[0, -1].legend(fontsize=6)
    save_figure(fig, out / "reward_per_step.png")

    rows = []
    for task in tasks:
        for method, e in summary[task].items():
            ci = "" if e.get("r2_ci") is None else f"[{e['r2_ci'][0]:.2f}, {e['r2_ci'][1]:.2f}]"
            rows.append([task, LABELS[method], f"{e['r2_mean']:.3f} {ci}", f"{e['mse_mean']:.4g}",
                         f"{e['r2_sample_mean_mean']:.3f}" if "r2_sample_mean_mean" in e else "",
                         f"{e['r2_probe_mean']:.3f}" if "r2_probe_mean" in e else "",
                         len([s for s in e["seeds"] if s is not None]) or "",
                         ", ".join(map(str, e.get("steps", []))), e.get("parameters", "")])
    table = markdown_table(["task", "method", "R² prior mean [95% CI]", "MSE", "R² mean of S samples",
                            "R² reward probe", "seeds", "training steps (early-stopped)", "parameters"], rows)
    video_rows = [[task, LABELS[m], f"{e['psnr_mean']:.1f}", f"{e['ssim_mean']:.3f}"] for task in tasks
                  for m, e in summary[task].items() if "psnr_mean" in e]
    video = markdown_table(["task", "method", "PSNR (dB)", "SSIM"], video_rows) if video_rows else "(none yet)"
    diff_rows = [[task, f"{d['r2_diff']:+.3f}", f"[{d['r2_diff_ci'][0]:+.3f}, {d['r2_diff_ci'][1]:+.3f}]",
                  d.get("seeds", "tasks: " + ", ".join(d.get("tasks", [])))]
                 for task, d in summary["struct_minus_cnn"].items()]
    diffs = markdown_table(["task", "Struct - CNN: R² difference", "95% bootstrap CI", "paired seeds"],
                           diff_rows) if diff_rows \
        else "(not enough paired seeds yet)"
    ae_rows = [[task, ae["kind"], ae["seed"], ae["steps"], "plateau" if ae.get("stopped") else "budget",
                ", ".join(f"{step:,}" for step, _ in ae.get("lr_reductions", [])), f"{ae['tracking_rmse_px']:.2f}",
                f"{late_change(ae['val_loss']):+.0%}"] for task, aes in results.get("autoencoders", {}).items()
               for ae in aes if ae.get("val_loss")]
    autoencoders = markdown_table(["task", "autoencoder", "seed", "steps", "ended by", "lr lowered at",
                                   "tracking RMSE (px)", "val loss, last quarter"], ae_rows) if ae_rows else "(none yet)"
    def r2(value: float | None, digits: int) -> str:
        return "undefined (no reward)" if value is None else f"{value:.{digits}f}"

    readout = "\n".join(f"- {task}: " + ", ".join(f"{r2(r['test_r2'], 3)} ({n} episodes; train {r2(r['train_r2'], 2)})"
                                                   for n, r in row["by_episodes"].items())
                        for task, row in results.get("state_readout", {}).items()) or "(not yet)"
    comparison = ""
    for task, c in results.get("compared_with", {}).items():
        rows = [[cell, " / ".join(f"{v:,}" for v in pair["steps"]), f"{pair['base']:.3f}", f"{pair['this']:.3f}",
                 f"{pair['this'] - pair['base']:+.3f}"] for cell, pair in c["cells"].items()]
        means = "\n".join(f"- {LABELS[m]}: mean R² difference {d['r2_diff']:+.3f}"
                          + (f" [{d['r2_diff_ci'][0]:+.3f}, {d['r2_diff_ci'][1]:+.3f}]" if d["r2_diff_ci"] else "")
                          + f" over {d['seeds']} paired seeds" for m, d in c["methods"].items())
        comparison += (f"\n\n{task}: these cells against the same cells of spec `{c['base']}` (tracking RMSE in px "
                       f"for autoencoders, test reward R² for VRNNs):\n\n"
                       + markdown_table(["cell", "steps (base / this)", c["base"], "this spec", "difference"], rows)
                       + f"\n\n{means}")
    others = [d.name for d in sorted(out.iterdir()) if (d / "results.json").is_file()]  # other specs' folders
    if others:
        comparison += "\n\nOther specs' runs: " + ", ".join(f"[`{name}`]({name}/README.md)" for name in others)
    by_task: dict[str, list[str]] = {}
    for entry in results["missing"]:
        task, cell = entry.split(" ", 1)
        by_task.setdefault(task, []).append(cell)
    missing = "\n".join(f"- {task}: {', '.join(cells)}" for task, cells in by_task.items()) or "none"
    experiment_readme(out, "experiments/reward_prediction.py", __doc__, f"""\
Spec `{results['spec']['name']}`: {', '.join(f'{k}={v}' for k, v in results['spec'].items() if k != 'name')}.
Cells finished: {results['cells_done']}; not yet run:

{missing}

Held-out open-loop reward prediction over {results['horizon']} predicted steps after {results['observed']} observed
(test windows of {results['observed'] + results['horizon']} steps, non-overlapping). R² is the mean over seeds of
each seed's mean over the predicted steps; CIs are 95% percentile bootstraps over seeds. Best-of-S figures
(oracle-selected) are in results.json only.

{table}

Autoencoders: held-out tracking (a linear read-out from the features to the true body positions, test
episodes) and how much the validation loss still fell over the last quarter of training (the best of the last
three evaluations against the best of the three before the quarter began; about 0 means a plateau):

{autoencoders}

The ceiling of any reward head on this data: the reward read from the true state without predicting anything
(teacher-forced MLP from the state, the previous state and the action; test R², by training episodes used):

{readout}

Paired by seed (the VRNN seed and the autoencoder seed it runs on; with fewer than 5 paired seeds the bootstrap
CI is little more than the range of the differences):

{diffs}

Video prediction from the same models, mean over the predicted steps of up to 32 test windows (first of 3
samples; per step in results.json):

{video}

![R² per predicted step](reward_per_step.png){comparison}""", results["machine"])


# ------------------------------------------------------------------------------------------ pretrained bundles
def export_pretrained(task: str, out: Path, spec: dict[str, Any], roots: tuple[Path, Path], dest: Path) -> Path | None:
    """Ship Struct-VRNN seed 0 (on keypoint autoencoder seed 0) of ``task`` as ``dest/<task>.pt`` (its committed
    weights: config, data spec, no optimiser state) with its model card ``dest/<task>.md``; None while its cells
    are not done."""
    ae, vrnn = cell_path(out, task, "ae_keypoints_seed0"), cell_path(out, task, "struct_seed0")
    checkpoint = out / "models" / task / "struct_seed0.pt"
    if not (ae.exists() and vrnn.exists() and checkpoint.exists()):
        return None
    model, ae, vrnn = kp_rl.load(checkpoint), read_json(ae), read_json(vrnn)
    model.save(dest / f"{task}.pt")
    scores = vrnn["scores"]["prior_mean"]
    size = model.image_size
    caveat = ""
    if model.config.keypoints.reference == "other":
        caveat += ("\n- Each training sequence was reconstructed from another episode's first frame (`keypoints.reference:"
                   "\n  other`), so keypoints also sit on what stands still through an episode (e.g. a goal).")
    if scores["r2_mean"] < 0.1:
        caveat += ("\n- **Its predicted rewards are little or no better than always predicting the mean reward** (R² < 0.1): use"
                   "\n  its keypoints, not `info[\"predicted_reward\"]` or `imagine()`'s rewards.")
    write_bytes(dest / f"{task}.md", f"""\
# pretrained:{task}

`kp_rl.load("pretrained:{task}")`: the `{spec['preset']}`-preset keypoint autoencoder ({model.config.keypoints.num_keypoints}
keypoints, {ae['parameters']:,} parameters) and Struct-VRNN with reward head ({vrnn['parameters']:,} parameters) of the
reward-prediction experiment (seed 0 of each; {out.as_posix()}/README.md).

- Data: `{model.data_spec.get('env_id')}`, {len(episode_files(roots[0]))} random-policy episodes (seed 0), {size}x{size}
  frames, the catalog's action repeat; 10% of the episodes held out for early stopping.
- Training: autoencoder {ae['steps']:,} steps, VRNN {vrnn['steps']:,} steps, each ended by the plateau rule or its budget
  (validation curves in the cells' JSON under {out.as_posix()}/cells/{task}/).
- Held-out tracking ({len(episode_files(roots[1]))} test episodes, seed 1): the keypoints locate the true body positions to
  {ae['tracking_rmse_px']:.2f} px RMSE by a linear read-out (always predicting the mean position: {ae['mean_position_rmse_px']:.2f} px).
- Held-out reward prediction, open loop from the prior mean, {len(scores['r2'])} steps after
  {model.config.dynamics.observed_steps} observed: R² {scores['r2_mean']:.3f} averaged over the steps
  ({', '.join(f'{v:.2f}' for v in scores['r2'])} per step).{caveat}
""".encode())
    return dest / f"{task}.pt"


# -------------------------------------------------------------------------------------------------------- main
def cell_path(out: Path, task: str, name: str) -> Path:
    return out / "cells" / task / f"{name}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="cpu", choices=sorted(SPECS), help="budget and sizes (default: cpu)")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the spec's tasks (default: all)")
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS), help="default: all")
    parser.add_argument("--workers", type=int, default=2, help="cells trained at a time (default: 2)")
    parser.add_argument("--max-hours", type=float, default=None, help="start no new cell after this long")
    parser.add_argument("--stash", action="store_true",
                        help="train nothing: copy unfinished autoencoder cells' checkpoints to <out>/partial (commit"
                             " it before a session ends; a run elsewhere resumes them)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: gather the finished cells into results.json and the README")
    parser.add_argument("--export-pretrained", action="store_true",
                        help="also ship each task's Struct-VRNN seed 0 as kp_rl/pretrained/<task>.pt + model card")
    parser.add_argument("--data", default="data", help="dataset folder (default: data)")
    parser.add_argument("--collect-workers", type=int, default=1,
                        help="processes collecting a missing dataset (default: 1; the gpu spec's six tasks need"
                             " ~9 min on one core)")
    parser.add_argument("--runs", default="runs/reward_prediction", help="checkpoints (default: runs/reward_prediction)")
    parser.add_argument("--out", default=None,
                        help="default: results/reward_prediction (cpu), results/reward_prediction/<spec> (others)")
    args = parser.parse_args()
    args.out = args.out or str(spec_out(args.spec))
    spec = {**SPECS[args.spec], "name": args.spec, "out": args.out, "models_dir": str(Path(args.out) / "models")}
    tasks = args.tasks or spec["tasks"]
    methods = args.methods or list(METHODS)
    out, runs, start = Path(args.out), Path(args.runs) / args.spec, time.perf_counter()
    models = Path(spec["models_dir"])
    if args.stash:
        unfinished = [(task, f"ae_{kind}_seed{seed}") for task in tasks for kind in AUTOENCODERS
                      for seed in range(spec["ae_seeds"]) if not cell_path(out, task, f"ae_{kind}_seed{seed}").exists()]
        stashed = stash(spec, runs, unfinished)
        print("\n".join(f"stashed {path}" for path in stashed) or "nothing to stash", flush=True)
        return
    if spec.get("warm_start"):  # the cells that do not depend on the autoencoders: the warm-start spec's own
        source = spec_out(spec["warm_start"], out.parent)
        for cell in sorted((source / "cells").glob("*/state_*.json")) + sorted((source / "cells").glob("*/mean_*.json")):
            if cell.parent.name in spec["tasks"] and not cell_path(out, cell.parent.name, cell.stem).exists():
                write_bytes(cell_path(out, cell.parent.name, cell.stem), cell.read_bytes())
    # (resumes; quick once collected)
    roots = {task: datasets(task, spec, Path(args.data), args.collect_workers) for task in tasks}

    # the cells in the order they are worth having: the state reference first (no autoencoder), then per
    # autoencoder seed its autoencoders and the VRNNs on them, headline methods before ablations
    ae_jobs = [("ae", task, kind, seed) for seed in range(spec["ae_seeds"]) for task in spec["tasks"]
               for kind in AUTOENCODERS if any(METHODS[method][0] == kind for method in methods)]
    vrnn_jobs = [("vrnn", task, method, seed) for ablation in (False, True) for seed in range(spec["seeds"])
                 for task in spec["tasks"] for method in methods
                 if METHODS[method][2] == ablation and seed < (spec["ablation_seeds"] if ablation else spec["seeds"])]
    # by autoencoder seed: its autoencoders, then the VRNNs on them (headline methods first), then the next seed's:
    # a run cut short has whole seeds of every method rather than many autoencoders and no VRNN
    def order(job: tuple) -> tuple:
        if job[0] == "vrnn" and job[2] == "state":
            return (0,)
        if job[0] == "ae":
            return (1, job[3], 0)
        return (1, job[3] % spec["ae_seeds"], 1, METHODS[job[2]][2], job[3])

    jobs = sorted([j for j in vrnn_jobs if j[2] == "state"] + ae_jobs + [j for j in vrnn_jobs if j[2] != "state"],
                  key=order)
    name = lambda job: f"ae_{job[2]}_seed{job[3]}" if job[0] == "ae" else f"{job[2]}_seed{job[3]}"  # noqa: E731
    todo = [j for j in jobs if j[1] in tasks and not cell_path(out, j[1], name(j)).exists()]
    done = sum(1 for j in jobs if cell_path(out, j[1], name(j)).exists())
    print(f"{done} of {len(jobs)} cells already done; "
          + ("reporting only" if args.report_only else f"{len(todo)} to run on {args.workers} worker(s)"), flush=True)
    todo = [] if args.report_only else todo

    def ready(job: tuple) -> bool:  # a VRNN needs its autoencoder's cell
        if job[0] == "ae" or METHODS[job[2]][0] == "state":
            return True
        return cell_path(out, job[1], f"ae_{METHODS[job[2]][0]}_seed{job[3] % spec['ae_seeds']}").exists()

    from tqdm.auto import tqdm

    context = mp.get_context("spawn")  # EGL and torch threads do not survive a fork
    bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not todo)
    failed: dict[str, str] = {}
    with futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        running: dict[futures.Future, tuple] = {}
        while todo or running:
            out_of_time = args.max_hours is not None and time.perf_counter() - start > args.max_hours * 3600
            while not out_of_time and len(running) < args.workers and any(ready(j) for j in todo):
                job = next(j for j in todo if ready(j))
                alone = spec["ae_threads"] > 1  # an autoencoder on several threads runs alone
                if alone and running and (job[0] == "ae" or any(j[0] == "ae" for j in running.values())):
                    break
                todo.remove(job)
                fn = autoencoder_cell if job[0] == "ae" else vrnn_cell
                running[pool.submit(fn, job[1], job[2], job[3], spec, roots[job[1]], runs)] = job
            if not running:
                break
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for future in done:
                job = running.pop(future)
                try:
                    row = future.result()
                except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the others
                    failed[f"{job[1]} {name(job)}"] = f"{type(exc).__name__}: {exc}"
                    bar.write(f"[{job[1]}] {name(job)} FAILED: {type(exc).__name__}: {exc}")
                    continue
                write_json(cell_path(out, job[1], name(job)), row)
                if job[0] == "ae":
                    commit_weights(runs / job[1] / name(job), models / job[1] / f"{name(job)}.pt")
                    shutil.rmtree(out / "partial" / job[1] / name(job), ignore_errors=True)  # stashed: done now
                elif name(job) == "struct_seed0":
                    commit_weights(runs / job[1] / "struct" / "seed0", models / job[1] / "struct_seed0.pt")
                bar.update()
                r2 = row["scores"]["prior_mean"]["r2_mean"] if "scores" in row else None
                bar.write(f"[{job[1]}] {name(job)}: {row['steps']} steps ({row['seconds']:.0f} s)"
                          + (f", test reward R² {r2:.3f}" if r2 is not None else
                             f", tracking {row['tracking_rmse_px']:.2f} px" if "tracking_rmse_px" in row else ""))

    bar.close()
    # gather every finished cell of the spec's tasks (this run's and earlier ones, --tasks or not) into
    # results.json and the README
    config = config_for(spec, 0)
    observed, horizon = config.dynamics.observed_steps, config.dynamics.predicted_steps
    for task in tasks:  # the data-only cells of the tasks run here
        if not cell_path(out, task, "mean_reward").exists():
            write_json(cell_path(out, task, "mean_reward"), baseline_cell(task, roots[task], observed, horizon))
        if not cell_path(out, task, "state_readout").exists():
            write_json(cell_path(out, task, "state_readout"), readout_cell(task, roots[task], spec["readout_steps"]))
    reported = [t for t in spec["tasks"] if cell_path(out, t, "mean_reward").exists()]
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task in reported:
        for method in methods:
            rows = [read_json(p) for p in sorted((out / "cells" / task).glob(f"{method}_seed*.json"))]
            if rows:
                cells.setdefault(task, {})[method] = rows
        cells.setdefault(task, {})["mean_reward"] = [read_json(cell_path(out, task, "mean_reward"))]
    autoencoders = {task: [read_json(p) for p in sorted((out / "cells" / task).glob("ae_*.json"))]
                    for task in reported}
    results = {"experiment": "reward_prediction", "spec": spec, "observed": observed, "horizon": horizon,
               "data_seeds": {"train": 0, "test": 1}, "machine": machine(),
               "cells_done": sum(1 for j in jobs if cell_path(out, j[1], name(j)).exists()),
               "missing": [f"{j[1]} {name(j)}" for j in jobs if not cell_path(out, j[1], name(j)).exists()],
               "autoencoders": autoencoders, "summary": summarise(cells),
               "state_readout": {task: read_json(cell_path(out, task, "state_readout")) for task in reported
                                 if cell_path(out, task, "state_readout").exists()}}
    if spec.get("compare_with"):
        results["compared_with"] = compare_specs(out.parent / spec["compare_with"], out, reported)
    write_json(out / "results.json", jsonable(results))
    report(jsonable(results), out)
    if args.export_pretrained:
        for task in tasks:
            path = export_pretrained(task, out, spec, roots[task], Path(kp_rl.__file__).parent / "pretrained")
            print(f"wrote {path}" if path else f"{task}: Struct-VRNN seed 0 not finished here; nothing exported")
    print(f"wrote {out}/results.json and README.md ({time.perf_counter() - start:.0f} s)")
    if failed:
        raise SystemExit("cells failed (rerun to retry them; the others are kept):\n" +
                         "\n".join(f"  {cell}: {why}" for cell, why in failed.items()))


if __name__ == "__main__":
    main()
