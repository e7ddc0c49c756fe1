"""Wrapper overhead: env steps/s of the raw pixel env vs the same env behind the keypoint wrappers.

Single env: ``kp_rl/<task>-v0`` raw vs :class:`~kp_rl.wrappers.KeypointObservation` (features, and features +
belief). Vector of ``--n-envs``: SB3's ``DummyVecEnv`` raw vs :class:`~kp_rl.wrappers.VecKeypointObservation`,
and Gymnasium's ``SyncVectorEnv`` raw vs :class:`~kp_rl.wrappers.VectorKeypointObservation` (all frames
encoded in one batch). The model is the ``--preset`` model with random weights (speed does not depend
on the weights) unless ``--model`` points to a checkpoint. Configurations are measured in interleaved rounds
(raw, wrapped, raw, ...) so that drifting machine load hits all of them alike; each figure is the median over
rounds, and each ratio the median of the per-round ratios to the raw env of the same round. The wrappers
encode with the model's own ``encode`` under ``torch.inference_mode``; its latency for one frame right after
an env step (cold caches, what a single-env wrapper pays) and back to back is reported too.
Writes results/bench_wrapper/{results.json, bench_wrapper.png}.

    python experiments/bench_wrapper.py [--task cartpole-swingup] [--steps 300] [--repeats 7] [--num-threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

import kp_rl
from kp_rl.bench import machine, median_rate
from kp_rl.files import save_figure, write_json
from kp_rl.model import resolve_device
from kp_rl.report import experiment_readme, markdown_table
from kp_rl.wrappers import KeypointObservation, VecKeypointObservation, VectorKeypointObservation


def single_stepper(env: gym.Env, steps: int) -> Callable[[], int]:
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape, env.action_space.dtype)

    def run() -> int:
        for _ in range(steps):
            *_, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        return steps

    return run


def vec_stepper(venv: VecEnv, steps: int) -> Callable[[], int]:
    venv.seed(0)
    venv.reset()
    actions = np.zeros((venv.num_envs, *venv.action_space.shape), venv.action_space.dtype)

    def run() -> int:
        for _ in range(steps):
            venv.step(actions)  # auto-resets finished sub-envs
        return steps * venv.num_envs

    return run


def gym_vector_stepper(envs: gym.vector.VectorEnv, steps: int) -> Callable[[], int]:
    envs.reset(seed=0)
    actions = np.zeros(envs.action_space.shape, envs.action_space.dtype)

    def run() -> int:
        for _ in range(steps):
            envs.step(actions)  # NEXT_STEP autoreset
        return steps * envs.num_envs

    return run


def encode_between_steps(encode: Callable[[np.ndarray], torch.Tensor], env: gym.Env, steps: int,
                         threads: int) -> dict[str, float]:
    """Milliseconds per one-frame ``encode`` right after each env step vs back to back (median of 3 rounds).

    What a single-env wrapper pays: between renders the encoder's caches are cold.
    """
    frame, _ = env.reset(seed=0)
    action = np.zeros(env.action_space.shape, env.action_space.dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    between, back_to_back = [], []
    try:
        with torch.inference_mode():
            for _ in range(3):
                spent = 0.0
                for _ in range(steps):
                    frame, *_ = env.step(action)
                    start = time.perf_counter()
                    encode(frame[None])
                    spent += time.perf_counter() - start
                between.append(1e3 * spent / steps)
                start = time.perf_counter()
                for _ in range(steps):
                    encode(frame[None])
                back_to_back.append(1e3 * (time.perf_counter() - start) / steps)
    finally:
        torch.set_num_threads(previous)
    return {"between env steps": statistics.median(between), "back to back": statistics.median(back_to_back)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="env steps per measurement (single env)")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--preset", default="cpu", help="model size when --model is not given")
    parser.add_argument("--model", default=None, help="checkpoint to time instead of a random-weight preset model")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch threads while the wrappers encode (their num_threads; 0: torch's global setting)")
    parser.add_argument("--device", default="cpu", help="where the wrappers run the model (cpu, cuda, auto)")
    parser.add_argument("--out", default="results/bench_wrapper")
    args = parser.parse_args()
    device = str(resolve_device(args.device))
    threads = args.num_threads or None
    default_threads = torch.get_num_threads()

    if args.model:
        model = kp_rl.load(args.model, device)
    else:
        cfg = kp_rl.get_preset(args.preset).replace(keypoints={"image_size": args.size})
        model = kp_rl.PerceptionModel(cfg, "keypoints", action_dim=1, with_dynamics=True).to(device).eval()

    def make() -> gym.Env:
        return kp_rl.make_env(args.task, image_size=args.size)

    n, single, vec, gvec = args.n_envs, "single: raw", f"{args.n_envs} envs: DummyVecEnv raw", \
        f"{args.n_envs} envs: SyncVectorEnv raw"
    kw = dict(model=model, num_threads=threads, device=device)
    envs: dict[str, tuple[str, gym.Env | VecEnv | gym.vector.VectorEnv]] = {  # label -> (its raw peer, env)
        single: (single, make()),
        "single: KeypointObservation": (single, KeypointObservation(make(), **kw)),
        "single: KeypointObservation(belief)": (single, KeypointObservation(make(), belief=True, **kw)),
        vec: (vec, DummyVecEnv([make] * n)),
        f"{n} envs: VecKeypointObservation": (vec, VecKeypointObservation(DummyVecEnv([make] * n), **kw)),
        f"{n} envs: VecKeypointObservation(belief)": (vec, VecKeypointObservation(DummyVecEnv([make] * n),
                                                                                  belief=True, **kw)),
        gvec: (gvec, gym.vector.SyncVectorEnv([make] * n)),
        f"{n} envs: VectorKeypointObservation": (gvec, VectorKeypointObservation(
            gym.vector.SyncVectorEnv([make] * n), **kw)),
    }

    def stepper(env: gym.Env | VecEnv | gym.vector.VectorEnv) -> Callable[[], int]:
        if isinstance(env, VecEnv):
            return vec_stepper(env, max(1, args.steps // n))
        if isinstance(env, gym.vector.VectorEnv):
            return gym_vector_stepper(env, max(1, args.steps // n))
        return single_stepper(env, args.steps)

    configs = {label: (base, stepper(env)) for label, (base, env) in envs.items()}
    for _, run in configs.values():  # warm-up
        run()
    rates: dict[str, list[float]] = {label: [] for label in configs}
    for _ in range(args.repeats):
        for label, (_, run) in configs.items():
            rates[label].append(median_rate(run, repeats=1, warmup=0)["median"])
    rows = {}
    for label, (base, _) in configs.items():
        ratios = [r / b for r, b in zip(rates[label], rates[base])]
        rows[label] = {"median": statistics.median(rates[label]), "min": min(rates[label]),
                       "max": max(rates[label]), "repeats": args.repeats, "vs_raw": statistics.median(ratios)}
    # the wrappers' encoder right after each raw env step vs back to back (cold vs warm caches)
    in_context = encode_between_steps(model.encode, envs[single][1], args.steps, threads or default_threads)
    for _, env in envs.values():
        env.close()

    title = f"{args.task}, {args.size}x{args.size}, {args.model or args.preset + ' preset'}, {device}"
    print(f"{'env steps/s (' + title + ')':60s} {'median':>9s} {'vs raw':>8s}")
    for label, row in rows.items():
        print(f"{label:60s} {row['median']:9.0f} {row['vs_raw']:7.2f}x")
    print(f"wrappers' torch threads: {threads or default_threads} (torch default here: {default_threads})")
    print("wrappers' encoder, one frame (ms): " + ", ".join(f"{k}: {v:.3f}" for k, v in in_context.items()))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {
        "task": args.task, "size": args.size, "steps": args.steps, "n_envs": args.n_envs,
        "model": args.model or f"{args.preset} preset (random weights)", "feature_dim": model.feature_dim,
        "device": device,
        "wrapper_threads": threads or default_threads, "env_steps_per_s": rows,
        "encode_1_frame_ms_in_context": in_context,
        "machine": machine(),
    })
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    labels = list(rows)[::-1]
    ax.barh(labels, [rows[k]["median"] for k in labels],
            xerr=[[rows[k]["median"] - rows[k]["min"] for k in labels],
                  [rows[k]["max"] - rows[k]["median"] for k in labels]],
            color=["tab:blue" if "raw" in k else "tab:orange" for k in labels])
    for y, k in enumerate(labels):
        ax.text(rows[k]["max"], y, f"  {rows[k]['vs_raw']:.2f}x", va="center", fontsize=8)
    ax.set_xlim(0, 1.15 * max(row["max"] for row in rows.values()))
    ax.set_xlabel(f"env steps/s ({title}; median of {args.repeats} rounds; ratio to raw)")
    save_figure(fig, out / "bench_wrapper.png")
    table = markdown_table(["setup", "env steps/s (median)", "vs raw"],
                           [[label, f"{row['median']:.0f}", f"{row['vs_raw']:.2f}x"] for label, row in rows.items()])
    experiment_readme(out, "experiments/bench_wrapper.py", __doc__, f"""\
{title}; wrappers on {threads or default_threads} torch thread(s); medians of {args.repeats} interleaved rounds of \
{args.steps} steps.

{table}

One frame through `model.encode` right after each env step: {in_context['between env steps']:.3f} ms \
({in_context['back to back']:.3f} ms back to back).

![env steps/s](bench_wrapper.png)""", machine())
    print(f"wrote {out}/results.json, README.md and bench_wrapper.png")


if __name__ == "__main__":
    main()
