"""Environment speed: kp_rl pixel envs vs Shimmy's dm_control envs, and collection throughput.

Every figure is frames/s (one physics control step + one 64x64 render per frame; action repeat 1 so both
envs do the same work), the median of several repeats, measured in this one run; speed-ups are ratios to
Shimmy measured alongside. Writes results/bench_env/{results.json, bench_env.png}.

    python experiments/bench_env.py [--task cartpole-swingup] [--steps 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import kp_rl
from kp_rl.bench import machine, median_rate
from kp_rl.files import save_figure, write_json
from kp_rl.data import collect


def stepper(env: gym.Env, steps: int, render: bool):
    env.reset(seed=0)
    action = np.zeros(env.action_space.shape, env.action_space.dtype)

    def run() -> int:
        for _ in range(steps):
            *_, terminated, truncated, _ = env.step(action)
            if render:
                env.render()
            if terminated or truncated:
                env.reset()
        return steps

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cartpole-swingup")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=8, help="episodes per collection measurement")
    parser.add_argument("--out", default="results/bench_env")
    args = parser.parse_args()
    import shimmy  # noqa: F401  # registers the dm_control/... ids

    domain, task = args.task.split("-", 1)
    spec = kp_rl.envs.get_spec(args.task)
    rows = {}
    shimmy_env = gym.make(f"dm_control/{domain}-{task}-v0", render_mode="rgb_array",
                          render_kwargs={"width": args.size, "height": args.size, "camera_id": spec.camera})
    rows["shimmy (step + render)"] = median_rate(stepper(shimmy_env, args.steps, True), args.repeats)
    shimmy_env.close()
    for label, visuals in [("kp_rl, shadows+reflections on", True), ("kp_rl, shadows+reflections off", False)]:
        env = kp_rl.make_env(args.task, image_size=args.size, action_repeat=1, shadows=visuals, reflections=visuals)
        rows[label] = median_rate(stepper(env, args.steps, False), args.repeats)
        env.close()
    base = rows["shimmy (step + render)"]["median"]
    for row in rows.values():
        row["vs_shimmy"] = row["median"] / base

    collection = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            manifest = collect(args.task, tmp, args.episodes, workers=workers, progress=False,
                               env_kwargs={"image_size": args.size})
            seconds = time.perf_counter() - start
        collection[f"{workers} worker(s)"] = {"frames_per_s": manifest["num_frames"] / seconds,
                                              "agent_steps": manifest["num_frames"], "seconds": seconds,
                                              "action_repeat": spec.action_repeat}

    print(f"{'env (' + args.task + f', {args.size}x{args.size})':44s} {'frames/s':>10s} {'vs shimmy':>10s}")
    for label, row in rows.items():
        print(f"{label:44s} {row['median']:10.0f} {row['vs_shimmy']:9.2f}x")
    print(f"\n{'collection (incl. process start, compression)':44s} {'frames/s':>10s}")
    for label, row in collection.items():
        print(f"{label:44s} {row['frames_per_s']:10.0f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", {"task": args.task, "size": args.size, "steps": args.steps,
                                             "env_frames_per_s": rows, "collection": collection,
                                             "machine": machine()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    labels = list(rows)
    ax.barh(labels, [rows[k]["median"] for k in labels],
            xerr=[[rows[k]["median"] - rows[k]["min"] for k in labels], [rows[k]["max"] - rows[k]["median"] for k in labels]])
    ax.set_xlabel(f"frames/s ({args.task}, {args.size}x{args.size}, median of {args.repeats})")
    save_figure(fig, out / "bench_env.png")
    print(f"wrote {out}/results.json and bench_env.png")


if __name__ == "__main__":
    main()
