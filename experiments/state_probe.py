"""How much of the true state does a keypoint agent's observation carry? Linear probes on held-out episodes.

For each perception model given (a checkpoint path or ``pretrained:<task>``) the observation is computed as the
wrappers compute it, for three agents: ``keypoints`` (one frame), ``keypoints x2`` (two stacked frames, what
``sac-keypoints`` sees) and ``keypoints+belief`` (the VRNN belief after every frame so far, what
``sac-keypoints-belief`` sees). A ridge readout (``kp_rl.metrics.fit_ridge``) fitted on the training episodes
predicts each dimension of the env's true state (dm_control's observation vector, e.g. cartpole: cart position,
pole cos / sin, cart and pole velocities); the held-out R² per dimension says what a linear policy head could read.
SAC's networks are not linear, so a low R² is a lower bound on what is there, a high one is evidence it is.

    python experiments/state_probe.py --task cartpole-swingup \\
        --models pretrained=pretrained:cartpole-swingup online=runs/.../perception/dynamics/model.pt

Data: ``data/<task>`` (training episodes) and ``data/<task>-test`` (held out), random-policy episodes as
``kp-rl collect`` writes them (with the ``state`` array). Writes ``results/state_probe/<task>/results.json`` and a
README table (``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kp_rl.bench import machine
from kp_rl.data import SequenceDataset
from kp_rl.files import write_json, write_text
from kp_rl.metrics import fit_ridge, predict_ridge
from kp_rl.perception import Perception

AGENTS = ("keypoints", "keypoints x2", "keypoints+belief")


def state_names(task: str) -> list[str]:
    """``key[i]`` for every entry of dm_control's observation vector of ``task`` (the ``state`` array's order)."""
    from dm_control import suite

    domain, name = task.split("-", 1)
    spec = suite.load(domain, name).observation_spec()
    return [f"{key}[{i}]" if int(np.prod(v.shape)) > 1 else key
            for key, v in spec.items() for i in range(int(np.prod(v.shape)))]


def observations(perception: Perception, episodes: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Per agent, one ``(L, dim)`` array of observations per episode (all episodes stepped together)."""
    out: dict[str, list[np.ndarray]] = {a: [] for a in AGENTS}
    with perception.running():
        for episode in episodes:
            features = perception.encode(episode["image"])  # (L, D)
            flat = features.cpu().numpy()
            out["keypoints"].append(flat)
            out["keypoints x2"].append(np.concatenate([np.concatenate([flat[:1], flat[:-1]]), flat], axis=1))
            if perception.model.dynamics is None:
                continue
            actions = torch.from_numpy(episode["action"]).float().to(features.device)
            state, rows = None, []
            for t in range(len(flat)):  # action[t] led to image[t]; the first frame starts a fresh belief
                state = perception.advance(state, features[t:t + 1], actions[t:t + 1] if t else None)
                rows.append(perception.output(features[t:t + 1], state))
            out["keypoints+belief"].append(np.concatenate(rows))
    return out


def r2(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Held-out R² per column (1 - SSE / SST around the held-out mean)."""
    return 1.0 - ((pred - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)


def probe(model: str, train: list[dict[str, np.ndarray]], test: list[dict[str, np.ndarray]],
          ridge: float) -> dict[str, list[float]]:
    perception = Perception(model, need_dynamics=False, who="state_probe", num_threads=None)
    obs_train, obs_test = observations(perception, train), observations(perception, test)
    y_train = np.concatenate([e["state"] for e in train])
    y_test = np.concatenate([e["state"] for e in test])
    return {agent: r2(predict_ridge(fit_ridge(np.concatenate(obs_train[agent]), y_train, ridge),
                                    np.concatenate(obs_test[agent])), y_test).tolist()
            for agent in AGENTS if obs_train[agent]}


def readme(task: str, names: list[str], results: dict[str, Any], notes: dict[str, str]) -> str:
    header = "| model | observation | " + " | ".join(f"`{n}`" for n in names) + " | mean |"
    rows = [header, "|" + "---|" * (len(names) + 3)]
    for model, per_agent in results["models"].items():
        for agent, values in per_agent.items():
            cells = " | ".join(f"{v:.2f}" for v in values)
            rows.append(f"| {model} | {agent} | {cells} | {np.mean(values):.2f} |")
    described = "\n".join(f"- `{k}`: {v}" for k, v in notes.items())
    return f"""# State probe: {task}

Held-out R² of a ridge readout (ridge {results['ridge']}) from an agent's observation to each dimension of the
true state, fitted on {results['episodes']['train']} training episodes, scored on {results['episodes']['test']}
held-out ones (random-policy data: `{results['data']}`). Made with `experiments/state_probe.py` at commit
{results['machine'].get('commit')} on {results['machine'].get('cpu', 'this machine')}.

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
    parser.add_argument("--out", type=Path, default=Path("results/state_probe"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys = ("image", "action", "state")
    train = list(SequenceDataset(args.data / args.task, 1, split="all", keys=keys).episodes)[:args.episodes]
    test = list(SequenceDataset(args.data / f"{args.task}-test", 1, split="all", keys=keys).episodes)
    models = dict(m.split("=", 1) for m in args.models)
    results: dict[str, Any] = {"task": args.task, "state_names": state_names(args.task), "ridge": args.ridge,
                               "data": str(args.data / args.task), "episodes": {"train": len(train), "test": len(test)},
                               "machine": machine(), "models": {}}
    for name, path in models.items():
        results["models"][name] = probe(path, train, test, args.ridge)
        print(name, {a: np.round(v, 2).tolist() for a, v in results["models"][name].items()})
    out = args.out / args.task
    write_json(out / "results.json", {**results, "checkpoints": models})
    write_text(out / "README.md", readme(args.task, results["state_names"], results, dict(
        n.split("=", 1) for n in args.notes)))
    print(f"wrote {out}/results.json, README.md")


if __name__ == "__main__":
    main()
