"""The embedded demo behind the README's main command (``scripts/demo.sh`` -> ``kp-rl demo``).

End to end on cartpole-swingup, on the CPU: collect random-policy episodes, train the keypoint autoencoder
and the CNN baseline, train a VRNN + reward head on each, compare their open-loop reward predictions on
held-out episodes, render a video prediction, train a short SAC agent on keypoints + VRNN belief, and
write a results page (``results/demo/README.md`` with PNG plots and a GIF). Every stage resumes: re-running
the command after an interruption continues where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from kp_rl.bench import machine
from kp_rl.config import get_preset
from kp_rl.files import save_figure, write_json, write_text
from kp_rl.data import collect
from kp_rl.report import dataset_summary

TASK = "cartpole-swingup"
FULL = {"episodes": 60, "max_steps": None, "image_size": 64, "autoencoder_steps": 1000, "dynamics_steps": 1500,
        "sac_steps": 4000, "eval_every": 1000}
QUICK = {"episodes": 3, "max_steps": 20, "image_size": 32, "autoencoder_steps": 4, "dynamics_steps": 4,
         "sac_steps": 40, "eval_every": 20}


def run_demo(out: Path, data: Path, quick: bool = False, runs: Path = Path("runs/demo")) -> dict[str, Any]:
    """Run the demo; returns the figures it reports (also in ``out/summary.json``).

    ``kp-rl demo`` gives the quick and the full demo folders of their own (``data/demo-cartpole-quick`` ...), so
    neither resumes the other's dataset or runs; pointed at the other's folders, a stage refuses in one line.
    """
    from matplotlib.figure import Figure  # not pyplot: no global backend, nothing left open

    from kp_rl.agents import get_agent, train_agent
    from kp_rl.envs import get_spec
    from kp_rl.evaluate import reward_prediction, write_video_prediction
    from kp_rl.model import load
    from kp_rl.train import train_autoencoder, train_dynamics

    budget = QUICK if quick else FULL
    config = get_preset("tiny").replace(train={"batch_size": 2, "log_every": 2}) if quick else get_preset("cpu")
    config = config.replace(train={"steps": budget["autoencoder_steps"], "dynamics_steps": budget["dynamics_steps"]})
    out.mkdir(parents=True, exist_ok=True)
    start = last = time.perf_counter()
    summary: dict[str, Any] = {"task": TASK, "budget": budget, "seconds": {}}

    def stage(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        summary["seconds"][name] = round(now - last, 1)
        last = now
        print(f"[demo] {name} done ({summary['seconds'][name]:.0f} s)", flush=True)

    # 1. data
    collect(TASK, data, budget["episodes"], seed=0, workers=2, max_steps=budget["max_steps"],
            env_kwargs={"image_size": budget["image_size"]})
    summary["dataset"] = dataset_summary(data, out)
    stage("collect")

    # 2. autoencoders and dynamics (structured and unstructured)
    models = {}
    for representation, label in (("keypoints", "Struct-VRNN"), ("cnn", "CNN-VRNN")):
        autoencoder = train_autoencoder(data, runs / representation, config, representation)
        models[label] = load(train_dynamics(autoencoder, data, runs / f"{representation}-dyn"))
        stage(f"train {label}")

    # 3. reward prediction on held-out episodes: observe N steps, predict M open loop (prior mean)
    dyn = config.dynamics
    scores = {label: reward_prediction(model, data) for label, model in models.items()}
    scores["mean training reward"] = {"prior_mean": scores["Struct-VRNN"]["mean_reward_baseline"]}
    summary["reward_prediction"] = {k: {"mse": v["prior_mean"]["mse_mean"], "r2": v["prior_mean"]["r2_mean"],
                                        "mse_per_step": v["prior_mean"]["mse"].tolist()} for k, v in scores.items()}
    print(f"\nreward prediction, {scores['Struct-VRNN']['windows']} held-out windows, {dyn.observed_steps} observed "
          f"-> {dyn.predicted_steps} predicted steps (prior mean)")
    print(f"{'model':24s} {'MSE':>8s} {'R^2':>7s}")
    ax = Figure(figsize=(5, 3)).subplots()
    for label, row in summary["reward_prediction"].items():
        print(f"{label:24s} {row['mse']:8.4f} {row['r2']:7.3f}")
        steps = np.arange(1, len(row["mse_per_step"]) + 1)
        ax.plot(steps, row["mse_per_step"], marker="o", label=f"{label} (R^2 {row['r2']:.2f})")
    ax.set(xlabel=f"prediction step (after {dyn.observed_steps} observed)", ylabel="reward MSE (held-out)")
    ax.legend(fontsize=7)
    save_figure(ax.figure, out / "reward_prediction.png")

    # 4. video prediction: truth | Struct-VRNN samples | CNN-VRNN samples
    write_video_prediction(models, data, out / "video_prediction", num_samples=2,
                           title=f"{TASK}: observe {dyn.observed_steps}, predict {3 * dyn.predicted_steps}")
    stage("evaluate")

    # 5. a short SAC agent on keypoints + VRNN belief
    agent = get_agent("sac-keypoints-belief")
    if quick:
        agent = replace(agent, hyperparameters={**agent.hyperparameters, "learning_starts": 10, "batch_size": 8})
    curve = train_agent(get_spec(TASK).env_id, agent, budget["sac_steps"], runs / "sac-keypoints-belief",
                        model=runs / "keypoints-dyn" / "model.pt", eval_every=budget["eval_every"],
                        eval_episodes=2 if quick else 5, env_kwargs={"image_size": budget["image_size"]})
    summary["sac"] = curve
    ax = Figure(figsize=(5, 3)).subplots()
    ax.errorbar(curve["steps"], curve["returns"], yerr=curve["returns_std"], marker="o", capsize=3)
    ax.set(xlabel="agent steps", ylabel="eval return")
    ax.set_title("SAC on keypoints + VRNN belief", fontsize=9)
    save_figure(ax.figure, out / "sac_curve.png")
    stage("sac")

    summary["seconds"]["total"] = round(time.perf_counter() - start, 1)
    summary["machine"] = machine()
    write_json(out / "summary.json", summary)
    _write_page(summary, out)
    print(f"\n[demo] finished in {summary['seconds']['total'] / 60:.1f} min; results page: {out / 'README.md'}")
    return summary


def _write_page(summary: dict[str, Any], out: Path) -> None:
    rp = summary["reward_prediction"]
    data = summary["dataset"]
    lines = [f"# kp_rl demo: {summary['task']}", "",
             f"Dataset: {data['episodes']} random-policy episodes, {data['frames']} frames.",
             "", "![frames](frames.png)", "", "## Reward prediction (held-out episodes)", "",
             "| model | reward MSE | R^2 |", "|---|---|---|"]
    lines += [f"| {k} | {v['mse']:.4f} | {v['r2']:.3f} |" for k, v in rp.items()]
    sac = summary["sac"]
    lines += ["", "![reward prediction](reward_prediction.png)", "", "## Video prediction", "",
              "Rows: truth, then two samples each of Struct-VRNN and CNN-VRNN (red frames: open-loop prediction).", "",
              "![video prediction](video_prediction.gif)", "", "## SAC on keypoints + belief", "",
              f"Final eval return {sac['returns'][-1]:.1f} after {sac['steps'][-1]} agent steps "
              f"({sac['seconds'][-1] / 60:.1f} min).", "", "![SAC](sac_curve.png)", "", "## Time per stage (s)", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["seconds"].items()]
    m = summary["machine"]
    load = "" if m.get("load_avg_1min") is None else f", 1-minute load at the end: {m['load_avg_1min']:.2f}"
    lines += ["", f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch thread(s), "
                  f"CUDA: {m['cuda'] or 'none'}{load}."]
    write_text(out / "README.md", "\n".join(lines) + "\n")
