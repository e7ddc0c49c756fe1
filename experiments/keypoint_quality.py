"""Do the unsupervised keypoints learn objects? Reconstruction and tracking on held-out episodes.

For each task (random-policy data, `cpu` preset unless --preset), this trains
  * ``keypoints``     : the full model (reconstruction + sparsity + temporal separation),
  * ``no_kp_losses``  : the same without the sparsity and separation losses (ablation),
and compares them with
  * ``random_init``   : the same architecture, untrained,
  * ``supervised``    : the encoder trunk + a linear head trained *with* the true body coordinates
                        (an upper reference for tracking),
  * ``mean_frame``    : predicting the training set's mean frame (reconstruction baseline),
  * ``mean_coords``   : predicting the training set's mean coordinates (tracking baseline).
Tracking error: ridge regression from the K*(x, y, mu) keypoints to the true 2-D positions of the tracked
objects (every body's centre, then the task's objects that are not bodies, e.g. reacher's target; named by the
dataset manifest's ``object_names``) in unit image coordinates ([-1, 1]), fitted on training episodes, RMSE on
held-out episodes (also in pixels); ``per_object_px`` breaks the keypoint model's error down by object.

    python experiments/keypoint_quality.py [--tasks cartpole-swingup walker-walk] [--steps 1000]

Writes results/keypoint_quality/{results.json, tracking.png, keypoints_<task>.png}; runs go to
runs/keypoint_quality/ and datasets to data/<task> (both resumable, both git-ignored).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kp_rl
from kp_rl.bench import machine
from kp_rl.data import SequenceDataset, collect, encode_episodes, read_manifest
from kp_rl.files import write_json
from kp_rl.envs import pixels_to_unit
from kp_rl.keypoints import add_coord_channels, build_encoder_trunk, preprocess_frames, trunk_channels
from kp_rl.metrics import tracking_error
from kp_rl.model import PerceptionModel
from kp_rl.files import save_figure
from kp_rl.report import keypoint_strip
from kp_rl.evaluate import reconstruction_errors
from kp_rl.train import seed_everything, train_autoencoder


def frames_and_coords(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    data = SequenceDataset(root, 1, split=split, keys=("image", "true_object_pos"))
    frames = np.concatenate([e["image"] for e in data.episodes])
    coords = np.concatenate([e["true_object_pos"] for e in data.episodes])
    return frames, pixels_to_unit(coords, frames.shape[1])


def encode(model: PerceptionModel, frames: np.ndarray) -> np.ndarray:
    return encode_episodes(model, [{"image": frames}])[0]


class SupervisedRegressor(nn.Module):
    """The keypoint encoder's trunk with a linear head, trained on the true coordinates."""

    def __init__(self, cfg: kp_rl.config.KeypointConfig, outputs: int):
        super().__init__()
        self.trunk = build_encoder_trunk(cfg, 5)
        self.squeeze = nn.Conv2d(trunk_channels(cfg), 8, 1)
        self.head = nn.Linear(8 * cfg.heatmap_width**2, outputs)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(self.trunk(add_coord_channels(preprocess_frames(frames))))
        return self.head(torch.nn.functional.leaky_relu(x, 0.2).flatten(1))


def supervised_predictions(cfg: Any, train: tuple[np.ndarray, np.ndarray], test_frames: np.ndarray, steps: int,
                           seed: int) -> np.ndarray:
    seed_everything(seed)
    frames, coords = train
    targets = torch.as_tensor(coords.reshape(len(coords), -1))
    model = SupervisedRegressor(cfg, targets.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    frames_t = torch.as_tensor(frames)
    for _ in range(steps):
        idx = torch.randint(len(frames_t), (64,))
        loss = (model(frames_t[idx]) - targets[idx]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.inference_mode():
        predict = lambda x: np.concatenate([model(torch.as_tensor(x[i:i + 256])).numpy() for i in range(0, len(x), 256)])
        return predict(test_frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["cartpole-swingup", "walker-walk"])
    parser.add_argument("--episodes", type=int, nargs="+", default=[100, 30], help="per task (random policy)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=1000, help="autoencoder training steps")
    parser.add_argument("--supervised-steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="data")
    parser.add_argument("--runs", default="runs/keypoint_quality")
    parser.add_argument("--out", default="results/keypoint_quality")
    args = parser.parse_args()
    out = Path(args.out)
    episodes = dict(zip(args.tasks, args.episodes + args.episodes[-1:] * len(args.tasks)))
    base = kp_rl.get_preset(args.preset).replace(train={"steps": args.steps, "seed": args.seed})
    variants = {"keypoints": base, "no_kp_losses": base.replace(keypoints={"sparsity_weight": 0.0,
                                                                            "separation_weight": 0.0})}
    results: dict[str, Any] = {"preset": args.preset, "steps": args.steps, "seed": args.seed, "tasks": {},
                               "machine": machine()}
    for task in args.tasks:
        root = Path(args.data) / task
        collect(task, root, episodes[task], seed=args.seed, workers=2)
        train_set, test_set = frames_and_coords(root, "train"), frames_and_coords(root, "val")
        mean_frame = preprocess_frames(torch.as_tensor(train_set[0])).mean(0)
        models: dict[str, PerceptionModel] = {}
        row: dict[str, Any] = {"train_frames": len(train_set[0]), "test_frames": len(test_set[0])}
        for name, cfg in variants.items():
            start = time.perf_counter()
            path = train_autoencoder(root, Path(args.runs) / task / name, cfg)
            models[name] = kp_rl.load(path)
            row[f"{name}_train_seconds_this_call"] = round(time.perf_counter() - start, 1)
        seed_everything(args.seed)
        models["random_init"] = PerceptionModel(base, "keypoints").eval()
        size = train_set[0].shape[1]
        pixels = (size - 1) / 2.0
        for name, model in models.items():
            err = tracking_error(encode(model, train_set[0]), train_set[1], encode(model, test_set[0]), test_set[1])
            recon = reconstruction_errors(model, root, mean_frame)
            row[name] = {"tracking_rmse": err["keypoint_rmse"], "tracking_rmse_px": err["keypoint_rmse"] * pixels,
                         "reconstruction": recon["model"]}
            row["mean_coords"] = {"tracking_rmse": err["mean_baseline_rmse"],
                                  "tracking_rmse_px": err["mean_baseline_rmse"] * pixels}
            row["mean_frame"] = {"reconstruction": recon["mean_frame"]}
        features = encode(models["keypoints"], train_set[0]), encode(models["keypoints"], test_set[0])
        objects = read_manifest(root).get("object_names") or [f"object {i}" for i in range(train_set[1].shape[1])]
        row["per_object_px"] = {name: tracking_error(features[0], train_set[1][:, i], features[1],
                                                     test_set[1][:, i])["keypoint_rmse"] * pixels
                                for i, name in enumerate(objects)}
        sup_test = supervised_predictions(base.keypoints, train_set, test_set[0], args.supervised_steps, args.seed)
        sup = float(np.sqrt(np.mean((sup_test - test_set[1].reshape(len(sup_test), -1)) ** 2)))
        row["supervised"] = {"tracking_rmse": sup, "tracking_rmse_px": sup * pixels}
        results["tasks"][task] = row
        keypoint_strip({k: models[k] for k in ("keypoints", "no_kp_losses")}, test_set[0],
                       out / f"keypoints_{task}.png", f"{task}: held-out episode, learned keypoints (opacity = mu)")

    names = ["keypoints", "no_kp_losses", "random_init", "supervised", "mean_coords"]
    print(f"\n{'task':18s} {'method':14s} {'tracking RMSE':>14s} {'(px)':>7s} {'recon err':>10s}")
    for task, row in results["tasks"].items():
        for name in names + ["mean_frame"]:
            r = row[name]
            track = f"{r['tracking_rmse']:14.4f} {r['tracking_rmse_px']:7.2f}" if "tracking_rmse" in r else " " * 22
            recon = f"{r['reconstruction']:10.2f}" if "reconstruction" in r else ""
            print(f"{task:18s} {name:14s} {track} {recon}")
        print(f"{task:18s} keypoints, per object (px): "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["per_object_px"].items()))
    write_json(out / "results.json", results)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["tasks"]), figsize=(4.5 * len(results["tasks"]), 3), squeeze=False)
    for ax, (task, row) in zip(axes[0], results["tasks"].items()):
        ax.bar(names, [row[n]["tracking_rmse_px"] for n in names], color=["C0", "C1", "C7", "C2", "C7"])
        ax.set_title(f"{task}: held-out tracking error", fontsize=9)
        ax.set_ylabel("RMSE (pixels, 64x64 frame)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    save_figure(fig, out / "tracking.png")
    print(f"wrote {out}/results.json, tracking.png, keypoints_<task>.png")


if __name__ == "__main__":
    main()
