"""Agent speed: SB3 SAC gradient updates/s and env steps/s per observation kind, on the CPU and on ``--device``.

For each agent of ``--agents`` (catalog names; keypoint agents use a random-weight ``--preset`` model, since
speed does not depend on the weights) on ``--task``: the agent's own VecEnv is stepped ``--fill`` times with
random actions (SAC's warm-up: env step, perception, replay-buffer insert), then ``algo.train`` is timed for
``--updates`` gradient steps, ``--repeats`` times (median). Both are measured on the CPU and, when
``--device`` is not the CPU, on that device in the same run, so the device column is a ratio to the CPU of
the same machine. For agents with perception it also times the agent's VecEnv step against the same env
without perception (interleaved rounds, median), and reports perception's cost per agent step as a share of
a SAC training step (one env step with perception + one gradient update). From these rates the script estimates the agent-training time of one run of the ``gpu``
spec (``experiments/structured_vs_unstructured_gpu.yaml``: 100k env steps = 100k / action repeat agent
steps, one update per agent step; perception training and evaluation not included).
Writes results/bench_agent/{results.json, bench_agent.png}.

    python experiments/bench_agent.py [--device cuda] [--task cartpole-swingup] [--updates 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

import kp_rl
from kp_rl.agents import build_agent, get_agent, make_vec_env
from kp_rl.bench import machine
from kp_rl.files import save_figure, write_json
from kp_rl.envs import get_spec
from kp_rl.model import resolve_device
from kp_rl.report import experiment_readme, markdown_table
from kp_rl.train import STAGE_THREADS

ENV_STEPS = 100_000  # the gpu spec's budget per run


def step_ms(venv, steps: int) -> float:
    """Milliseconds per ``venv.step`` with random actions."""
    start = time.perf_counter()
    for _ in range(steps):
        venv.step(np.stack([venv.action_space.sample() for _ in range(venv.num_envs)]))
    return 1e3 * (time.perf_counter() - start) / steps


def perception_ms(venv, env_id: str, steps: int, rounds: int = 5) -> float:
    """Milliseconds perception adds to one step of ``venv`` (vs the same env without it; median of rounds)."""
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv

    raw = DummyVecEnv([lambda: Monitor(gym.make(env_id))] * venv.num_envs)
    raw.reset()
    venv.reset()
    try:
        return statistics.median(step_ms(venv, steps) - step_ms(raw, steps) for _ in range(rounds))
    finally:
        raw.close()


def measure(agent: str, task: str, device: str, model: kp_rl.PerceptionModel | None, fill: int, updates: int,
            repeats: int) -> dict[str, float]:
    """Env steps/s (random-action warm-up) and gradient updates/s of one agent on one device."""
    spec = get_agent(agent)
    hyper = dict(spec.hyperparameters, buffer_size=max(fill * 2, 1000), learning_starts=fill)
    spec = dataclasses.replace(spec, hyperparameters=hyper)
    venv = make_vec_env(get_spec(task).env_id, spec, model.to(device) if spec.needs_model else None, seed=0,
                        device=device)
    try:
        extra = perception_ms(venv, get_spec(task).env_id, fill) if spec.needs_model else 0.0
        algo = build_agent(spec, venv, seed=0, device=device)
        start = time.perf_counter()
        algo.learn(fill)  # all warm-up: random actions, no gradient step
        steps_per_s = fill / (time.perf_counter() - start)
        batch = int(hyper.get("batch_size", 256))

        def sync() -> None:
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()

        algo.train(gradient_steps=5, batch_size=batch)  # warm-up (cuDNN autotune, allocator)
        rates = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            algo.train(gradient_steps=updates, batch_size=batch)
            sync()
            rates.append(updates / (time.perf_counter() - start))
    finally:
        venv.close()
    updates_per_s = statistics.median(rates)
    agent_steps = ENV_STEPS // get_spec(task).action_repeat
    hours = agent_steps * (1 / steps_per_s + 1 / updates_per_s) / 3600
    sac_step_ms = 1e3 / steps_per_s + 1e3 / updates_per_s
    return {"env_steps_per_s": steps_per_s, "updates_per_s": updates_per_s, "updates_min": min(rates),
            "updates_max": max(rates), "agent_steps_100k": agent_steps, "hours_per_100k_run": hours,
            "perception_ms_per_step": extra, "sac_step_ms": sac_step_ms, "perception_share": extra / sac_step_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (the CPU is always measured)")
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--agents", nargs="+", default=["sac-pixels", "sac-keypoints-belief", "sac-state"])
    parser.add_argument("--preset", default="cpu", help="perception model size for the keypoint agents")
    parser.add_argument("--fill", type=int, default=300, help="warm-up env steps (timed as env steps/s)")
    parser.add_argument("--updates", type=int, default=40, help="gradient steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: what kp-rl rl uses, kp_rl.train.STAGE_THREADS['agent'])")
    parser.add_argument("--out", default="results/bench_agent")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or STAGE_THREADS["agent"] or torch.get_num_threads())
    device = str(resolve_device(args.device))
    devices = ["cpu"] + ([device] if device != "cpu" else [])
    cfg = kp_rl.get_preset(args.preset).replace(keypoints={"image_size": 64})
    probe = gym.make(get_spec(args.task).env_id)
    action_dim = gym.spaces.flatdim(probe.action_space)
    probe.close()
    model = kp_rl.PerceptionModel(cfg, "keypoints", action_dim=action_dim, with_dynamics=True).eval()
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for agent in args.agents:
        rows[agent] = {}
        for d in devices:
            rows[agent][d] = measure(agent, args.task, d, model, args.fill, args.updates, args.repeats)
            rows[agent][d]["updates_vs_cpu"] = rows[agent][d]["updates_per_s"] / rows[agent]["cpu"]["updates_per_s"]

    print(f"SAC on {args.task} ({args.preset} preset for keypoint agents); {machine()['cuda'] or machine()['cpu']}")
    print(f"{'agent':24s} {'device':8s} {'env steps/s':>12s} {'updates/s':>10s} {'vs cpu':>7s} "
          f"{'h per 100k-env-step run':>24s} {'perception ms':>14s} {'% of SAC step':>14s}")
    for agent, per_device in rows.items():
        for d, row in per_device.items():
            print(f"{agent:24s} {d:8s} {row['env_steps_per_s']:12.0f} {row['updates_per_s']:10.1f} "
                  f"{row['updates_vs_cpu']:6.2f}x {row['hours_per_100k_run']:24.2f} "
                  f"{row['perception_ms_per_step']:14.2f} {100 * row['perception_share']:13.1f}%")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {
        "task": args.task, "preset": args.preset, "fill": args.fill, "updates": args.updates,
        "repeats": args.repeats, "devices": devices, "agents": rows, "machine": machine(),
    })
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(devices)
    for i, d in enumerate(devices):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [rows[a][d]["updates_per_s"] for a in rows], width, label=d)
    ax.set_xticks([j + width * (len(devices) - 1) / 2 for j in range(len(rows))], list(rows))
    ax.set_yscale("log")
    ax.set_ylabel("SAC gradient updates/s")
    ax.set_title(f"{args.task}: {machine()['cuda'] or machine()['cpu']}", fontsize=9)
    ax.legend()
    save_figure(fig, out / "bench_agent.png")
    table = markdown_table(
        ["agent", "device", "env steps/s", "updates/s", "vs CPU", "h per 100k-env-step run", "perception ms/step",
         "perception share of a SAC step"],
        [[agent, d, f"{r['env_steps_per_s']:.0f}", f"{r['updates_per_s']:.1f}", f"{r['updates_vs_cpu']:.2f}x",
          f"{r['hours_per_100k_run']:.2f}", f"{r['perception_ms_per_step']:.2f}", f"{100 * r['perception_share']:.1f}%"]
         for agent, per_device in rows.items() for d, r in per_device.items()])
    experiment_readme(out, "experiments/bench_agent.py", __doc__, f"""\
SAC on {args.task}; keypoint agents with a random-weight `{args.preset}` model; warm-up of {args.fill} env steps, \
{args.repeats} x {args.updates} timed updates; torch threads: {torch.get_num_threads()}.

{table}

![updates/s](bench_agent.png)""", machine())
    print(f"wrote {out}/results.json, README.md and bench_agent.png")


if __name__ == "__main__":
    main()
