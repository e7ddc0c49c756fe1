"""Torch CPU threads per stage, on an idle machine and beside one busy process: what the defaults rest on.

For each training stage of the `cpu` preset (an autoencoder step, a VRNN step, a SAC update on keypoint
features) the script measures steps/s with 1 thread and with one thread per core, once with the machine
otherwise idle and once while one other single-threaded process spins on a core (what a user's second job,
or a second experiment cell, does). Rounds are interleaved; each figure is the median over rounds.
Writes results/bench_threads/results.json.

    python experiments/bench_threads.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import kp_rl
from kp_rl.bench import machine
from kp_rl.files import write_json
from kp_rl.keypoints import preprocess_frames
from kp_rl.report import experiment_readme, markdown_table


def stage_steps(preset: str) -> dict[str, Callable[[], None]]:
    """One optimiser step of each stage, on random data of the preset's batch shapes."""
    torch.manual_seed(0)
    cfg = kp_rl.get_preset(preset)
    train, dyn = cfg.train, cfg.dynamics
    model = kp_rl.PerceptionModel(cfg, "keypoints", action_dim=1, with_dynamics=True).train()
    size = cfg.keypoints.image_size
    frames = preprocess_frames(torch.randint(0, 256, (train.batch_size, train.sequence_length, size, size, 3),
                                             dtype=torch.uint8))
    ae_opt = torch.optim.Adam(model.autoencoder.parameters(), lr=1e-3)
    b, t = train.dynamics_batch_size, dyn.sequence_length
    features, actions, rewards = torch.rand(b, t, model.feature_dim), torch.rand(b, t, 1), torch.rand(b, t)
    dyn_opt = torch.optim.Adam(model.dynamics.parameters(), lr=1e-3)
    # SAC's update on keypoint + belief features: SB3's default MLPs (256, 256), batch 256, actor and twin critic
    obs_dim = model.feature_dim + model.dynamics.belief_dim
    mlp = lambda n_in, n_out: torch.nn.Sequential(torch.nn.Linear(n_in, 256), torch.nn.ReLU(),  # noqa: E731
                                                  torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, n_out))
    actor, critics = mlp(obs_dim, 2), torch.nn.ModuleList([mlp(obs_dim + 1, 1), mlp(obs_dim + 1, 1)])
    sac_opt = torch.optim.Adam([*actor.parameters(), *critics.parameters()], lr=3e-4)
    obs = torch.randn(256, obs_dim)

    def autoencoder() -> None:
        loss, _ = model.autoencoder.loss(frames)
        ae_opt.zero_grad()
        loss.backward()
        ae_opt.step()

    def vrnn() -> None:
        loss, _ = model.dynamics.loss(features, actions, rewards, 100, 1000)
        dyn_opt.zero_grad()
        loss.backward()
        dyn_opt.step()

    def sac_update() -> None:
        action = torch.tanh(actor(obs)[:, :1])
        q = sum(c(torch.cat([obs, action], -1)).mean() for c in critics)
        sac_opt.zero_grad()
        (-q + actor(obs).pow(2).mean()).backward()
        sac_opt.step()

    return {"autoencoder": autoencoder, "vrnn": vrnn, "sac update (keypoints + belief)": sac_update}


def rate(step: Callable[[], None], seconds: float) -> float:
    step()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--out", default="results/bench_threads")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    steps = stage_steps(args.preset)
    counts = sorted({1, cores})
    rates: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for load in ("idle", "one busy core"):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load != "idle" else None
            try:
                time.sleep(0.2 if spinner else 0)
                for stage, step in steps.items():
                    for threads in counts:
                        torch.set_num_threads(threads)
                        rates.setdefault(f"{stage} | {threads} thread(s) | {load}", []).append(
                            rate(step, args.seconds))
            finally:
                if spinner:
                    spinner.kill()
                    spinner.wait()
    rows = {key: {"median": statistics.median(v), "min": min(v), "max": max(v)} for key, v in rates.items()}
    print(f"steps/s, {args.preset} preset, {machine()['cpu']} ({cores} cores); median of {args.rounds} rounds")
    for key, row in rows.items():
        print(f"  {key:60s} {row['median']:8.1f}  [{row['min']:.1f}, {row['max']:.1f}]")
    # the default per stage: the thread count whose worst fraction of the best rate (over both loads) is highest
    choice = {}
    for stage in steps:
        worst = {}
        for threads in counts:
            fractions = []
            for load in ("idle", "one busy core"):
                best = max(rows[f"{stage} | {n} thread(s) | {load}"]["median"] for n in counts)
                fractions.append(rows[f"{stage} | {threads} thread(s) | {load}"]["median"] / best)
            worst[threads] = min(fractions)
        choice[stage] = {"threads": max(worst, key=worst.get), "worst_fraction_of_best": worst}
        print(f"  {stage}: {choice[stage]['threads']} thread(s) (worst fraction of the best rate: "
              + ", ".join(f"{n} thread(s) {w:.2f}" for n, w in worst.items()) + ")")
    write_json(Path(args.out) / "results.json", {"preset": args.preset, "seconds": args.seconds,
                                                 "rounds": args.rounds, "steps_per_s": rows, "choice": choice,
                                                 "machine": machine()})
    table = markdown_table(["stage", "load", *[f"{n} thread(s): steps/s" for n in counts]],
                           [[stage, load, *[f"{rows[f'{stage} | {n} thread(s) | {load}']['median']:.1f}" for n in counts]]
                            for stage in steps for load in ("idle", "one busy core")])
    choices = "\n".join(f"- {stage}: **{c['threads']} thread(s)** (worst fraction of the best rate: "
                         + ", ".join(f"{n} thread(s) {w:.2f}" for n, w in c["worst_fraction_of_best"].items()) + ")"
                         for stage, c in choice.items())
    experiment_readme(args.out, "experiments/bench_threads.py", __doc__, f"""\
`{args.preset}` preset; {args.seconds:g} s per measurement, medians of {args.rounds} interleaved rounds.

{table}

The thread count that keeps the most of the best rate in the worse of the two conditions:

{choices}""", machine())
    print(f"wrote {args.out}/results.json and README.md")


if __name__ == "__main__":
    main()
