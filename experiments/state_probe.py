"""How much of the true state does a keypoint agent's observation carry? Linear probes on held-out episodes.

For each perception model given (a checkpoint path or ``pretrained:<task>``) the observation is computed as the
wrappers compute it, for three agents: ``keypoints`` (one frame), ``keypoints x2`` (two stacked frames, what
``sac-keypoints`` sees) and ``keypoints+belief`` (the VRNN belief after every frame so far, what
``sac-keypoints-belief`` sees). A ridge readout (``kp_rl.metrics.fit_ridge``) fitted on the training episodes
predicts each dimension of the env's true state (dm_control's observation vector, e.g. cartpole: cart position,
pole cos / sin, cart and pole velocities) and each tracked object's pixel position (``true_object_pos``, e.g.
reacher's target), and so does an MLP of SAC's width (two layers of 256, ReLU) trained on
the same pairs; the held-out R² per dimension says what a linear head, and what a network like SAC's, can read
(a velocity is a nonlinear function of two frames' keypoints: the MLP is the fairer probe for stacked frames).

    python experiments/state_probe.py --task cartpole-swingup \\
        --models pretrained=pretrained:cartpole-swingup online=runs/.../perception/dynamics/model.pt

Data: ``data/<task>`` (training episodes) and ``data/<task>-test`` (held out), random-policy episodes as
``kp-rl collect`` writes them (with the ``state`` array). Writes ``results/state_probe/<task>/results.json`` and a
README table (``--out``). ``--jitter`` measures instead how much of each observation value's variance is
frame-to-frame change (raw and intensity-gated keypoints, the belief, the true state) and writes ``jitter.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kp_rl.bench import machine
from kp_rl.data import SequenceDataset, read_manifest
from kp_rl.files import write_json, write_text
from kp_rl.metrics import fit_ridge, predict_ridge, reward_prediction_error
from kp_rl.perception import Perception

AGENTS = ("keypoints", "keypoints x2", "keypoints+belief")


def state_names(task: str) -> list[str]:
    """``key[i]`` for every entry of dm_control's observation vector of ``task`` (the ``state`` array's order)."""
    from dm_control import suite

    domain, name = task.split("-", 1)
    spec = suite.load(domain, name).observation_spec()
    return [f"{key}[{i}]" if int(np.prod(v.shape)) > 1 else key
            for key, v in spec.items() for i in range(int(np.prod(v.shape)))]


def targets(episode: dict[str, np.ndarray]) -> np.ndarray:
    """``(L, S + 2 * objects)``: the true state, then each tracked object's pixel column and row (e.g. reacher's
    target, which sits still through an episode)."""
    objects = episode["true_object_pos"]
    return np.concatenate([episode["state"], objects.reshape(len(objects), -1)], axis=1)


def object_names(root: Path) -> list[str]:
    """``<object>.x``, ``<object>.y`` for the objects a dataset's manifest names (none: an empty list)."""
    names = read_manifest(root).get("object_names", [])
    return [f"{name}.{axis}" for name in names for axis in "xy"]


def observations(perception: Perception, episodes: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Per agent, one ``(L, dim)`` array of observations per episode (all episodes stepped together)."""
    out: dict[str, list[np.ndarray]] = {a: [] for a in AGENTS}
    belief = perception.model.dynamics is not None
    for episode in episodes:
        full, _ = perception.replay(episode["image"], episode["action"], belief)  # (L, D [+ belief_dim])
        flat = full[:, :perception.model.feature_dim]
        out["keypoints"].append(flat)
        out["keypoints x2"].append(np.concatenate([np.concatenate([flat[:1], flat[:-1]]), flat], axis=1))
        if belief:
            out["keypoints+belief"].append(full)
    return out


def change_share(episodes: list[np.ndarray]) -> np.ndarray:
    """Per column, the share of its variance that is frame-to-frame change: ``var(x[t+1] - x[t]) / (2 var(x))``,
    pooled over episodes. About 0 for a smooth signal, 1 for white noise (and 2 for a sign flip every frame)."""
    values = np.concatenate(episodes)
    steps = np.concatenate([np.diff(e, axis=0) for e in episodes])
    return steps.var(0) / (2 * values.var(0) + 1e-12)


def mean_step(episodes: list[np.ndarray]) -> list[float]:
    """Per keypoint of flat ``(x, y, mu) * K`` rows, the mean squared frame-to-frame step of ``(x, y)``."""
    steps = np.concatenate([np.diff(e, axis=0) for e in episodes]).reshape(-1, episodes[0].shape[1] // 3, 3)
    return (steps[:, :, :2] ** 2).sum(-1).mean(0).tolist()


def jitter(model: str, episodes: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """How noisy each part of a keypoint model's observation is from frame to frame, against the true state:
    per keypoint its mean intensity, the share of frames it is on (mu > 0.5), :func:`change_share` of its raw
    coordinates, and the mean squared frame-to-frame step of its raw ``(x, y)`` and of the gated ``(mu x, mu y)``
    agents see (absolute: what a policy's input moves by); of the belief the quartiles of :func:`change_share`."""
    perception = Perception(model, need_dynamics=False, who="state_probe", num_threads=None)
    dim = perception.model.feature_dim
    with perception.running():
        raw = [perception.encode(e["image"]).cpu() for e in episodes]
    gated = [perception.model.autoencoder.observed(r).numpy() for r in raw]
    raw = [r.numpy() for r in raw]
    mu = np.concatenate(raw)[:, 2::3]
    out: dict[str, Any] = {
        "intensity": mu.mean(0).tolist(), "on": (mu > 0.5).mean(0).tolist(),
        "raw_xy": change_share(raw).reshape(-1, 3)[:, :2].mean(1).tolist(),
        "raw_step": mean_step(raw), "gated_step": mean_step(gated),
        "state": change_share([e["state"] for e in episodes]).tolist()}
    if perception.model.dynamics is not None:
        full = [perception.replay(e["image"], e["action"], True)[0][:, dim:] for e in episodes]
        out["belief_quartiles"] = np.quantile(change_share(full), [0.25, 0.5, 0.75]).tolist()
    return out


def r2(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Held-out R² per column (1 - SSE / SST around the held-out mean; nan for a constant column)."""
    return reward_prediction_error(pred, target)["r2"]


def mlp_predictions(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, steps: int,
                    seed: int = 0) -> np.ndarray:
    """An MLP (256-256, ReLU; inputs and targets standardised on the training set) fitted with Adam, then applied."""
    torch.manual_seed(seed)
    mx, sx = x_train.mean(0), x_train.std(0) + 1e-6
    my, sy = y_train.mean(0), y_train.std(0) + 1e-6
    x, y = torch.as_tensor((x_train - mx) / sx, dtype=torch.float32), torch.as_tensor((y_train - my) / sy,
                                                                                        dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, y.shape[1]))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        index = torch.randint(len(x), (256,))
        loss = (net(x[index]) - y[index]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return net(torch.as_tensor((x_test - mx) / sx, dtype=torch.float32)).numpy() * sy + my


def probe(model: str, train: list[dict[str, np.ndarray]], test: list[dict[str, np.ndarray]], ridge: float,
          mlp_steps: int) -> dict[str, dict[str, list[float]]]:
    """Per agent: held-out R² per :func:`targets` column of the linear and the MLP readout."""
    perception = Perception(model, need_dynamics=False, who="state_probe", num_threads=None)
    obs_train, obs_test = observations(perception, train), observations(perception, test)
    y_train = np.concatenate([targets(e) for e in train])
    y_test = np.concatenate([targets(e) for e in test])
    out = {}
    for agent in (a for a in AGENTS if obs_train[a]):
        x_train, x_test = np.concatenate(obs_train[agent]), np.concatenate(obs_test[agent])
        out[agent] = {"linear": r2(predict_ridge(fit_ridge(x_train, y_train, ridge), x_test), y_test).tolist(),
                      "mlp": r2(mlp_predictions(x_train, y_train, x_test, mlp_steps), y_test).tolist()}
    return out


def readme(task: str, names: list[str], results: dict[str, Any], notes: dict[str, str]) -> str:
    header = "| model | observation | probe | " + " | ".join(f"`{n}`" for n in names) + " | mean |"
    rows = [header, "|" + "---|" * (len(names) + 4)]
    for model, per_agent in results["models"].items():
        for agent, probes in per_agent.items():
            for kind, values in probes.items():
                cells = " | ".join("constant" if np.isnan(v) else f"{v:.2f}" for v in values)
                rows.append(f"| {model} | {agent} | {kind} | {cells} | {np.nanmean(values):.2f} |")
    described = "\n".join(f"- `{k}`: {v}" for k, v in notes.items())
    return f"""# State probe: {task}

Held-out R² of a ridge readout (ridge {results['ridge']}) and of an MLP (256-256, {results['mlp_steps']} Adam steps)
from an agent's observation to each dimension of the true state, fitted on {results['episodes']['train']} training episodes, scored on {results['episodes']['test']}
held-out ones (random-policy data: `{results['data']}`). Made with `experiments/state_probe.py` at commit
{results['machine'].get('commit')} on {results['machine'].get('cpu', 'this machine')}. A target that does not vary
(e.g. the cart's height on its rail) has no R² ("constant"); the mean is over the others.

{chr(10).join(rows)}

Models:
{described}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--models", nargs="+", required=True, help="name=checkpoint (or name=pretrained:<task>)")
    parser.add_argument("--notes", nargs="*", default=[], help="name=text: what each model is (for the README)")
    parser.add_argument("--data", type=Path, default=Path("data"))
    parser.add_argument("--episodes", type=int, default=None, help="use only this many training episodes")
    parser.add_argument("--ridge", type=float, default=1e-3)
    parser.add_argument("--mlp-steps", type=int, default=3000)
    parser.add_argument("--jitter", action="store_true",
                        help="instead of the probes: the observations' frame-to-frame change on the held-out "
                             "episodes (<out>/<task>/jitter.json)")
    parser.add_argument("--out", type=Path, default=Path("results/state_probe"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys = ("image", "action", "state", "true_object_pos")
    test = list(SequenceDataset(args.data / f"{args.task}-test", 1, split="all", keys=keys).episodes)
    models = dict(m.split("=", 1) for m in args.models)
    if args.jitter:
        report = {"task": args.task, "data": str(args.data / f"{args.task}-test"), "episodes": len(test),
                  "machine": machine(), "checkpoints": models,
                  "models": {name: jitter(path, test) for name, path in models.items()}}
        write_json(args.out / args.task / "jitter.json", report)
        for name, j in report["models"].items():
            print(name, "keypoint x, y change share:", np.round(j["raw_xy"], 2), "state:", np.round(j["state"], 3),
                  "mean squared step raw / gated:", np.round(j["raw_step"], 3), np.round(j["gated_step"], 3))
        return
    train = list(SequenceDataset(args.data / args.task, 1, split="all", keys=keys).episodes)[:args.episodes]
    names = state_names(args.task) + object_names(args.data / args.task)
    results: dict[str, Any] = {"task": args.task, "state_names": names, "ridge": args.ridge, "mlp_steps": args.mlp_steps,
                               "data": str(args.data / args.task), "episodes": {"train": len(train), "test": len(test)},
                               "machine": machine(), "models": {}}
    for name, path in models.items():
        results["models"][name] = probe(path, train, test, args.ridge, args.mlp_steps)
        print(name, {a: {k: np.round(v, 2).tolist() for k, v in p.items()} for a, p in results["models"][name].items()})
    out = args.out / args.task
    write_json(out / "results.json", {**results, "checkpoints": models})
    write_text(out / "README.md", readme(args.task, results["state_names"], results, dict(
        n.split("=", 1) for n in args.notes)))
    print(f"wrote {out}/results.json, README.md")


if __name__ == "__main__":
    main()
