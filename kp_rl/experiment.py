"""Experiment grids: tasks x agents x seeds from a YAML spec, with the perception models they need.

A spec (see ``experiments/structured_vs_unstructured_cpu.yaml``)::

    name: structured_vs_unstructured_cpu
    tasks: [cartpole-swingup, reacher-easy, finger-spin]
    agents: [sac-keypoints-belief, sac-pixels, sac-state]
    seeds: [0, 1, 2]
    steps: 7500            # agent steps per run (or env_steps: 60000, divided by each task's action repeat)
    eval_every: 1500
    eval_episodes: 5
    perception: {preset: cpu, episodes: 100, autoencoder_steps: 1000, dynamics_steps: 2000}
    resources: {perception: {cpus: 2}, default: {cpus: 1}, sac-pixels: {cpus: 1, gpus: 1}}   # Ray only

:func:`run_experiment` trains the perception models a task's agents need (once per task), then every
(task, agent, seed) cell (finished ones skipped, unfinished ones resumed), and :func:`summarise` writes
``results/<name>/results.json`` and plots. :func:`kp_rl.ray_grid.run_experiment_ray` runs the cells on Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kp_rl.agents import get_agent
from kp_rl.files import read_json, read_yaml, save_figure, write_json

PERCEPTION_DEFAULTS = {"preset": "cpu", "episodes": 100, "autoencoder_steps": 1000, "dynamics_steps": 2000}
# Observation kind -> the perception models it needs (run folders under models/<task>/; the last one is loaded)
MODELS_FOR_OBSERVATION = {"keypoints": ("keypoints",), "keypoints+belief": ("keypoints", "keypoints-dyn"),
                          "cnn-vrnn": ("cnn", "cnn-dyn")}
# What one Ray task asks for (``resources:`` in a spec overrides per agent name, ``default`` or ``perception``)
RESOURCE_DEFAULTS = {"perception": {"cpus": 2, "gpus": 0}, "default": {"cpus": 1, "gpus": 0}}


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    tasks: list[str]
    agents: list[str]
    seeds: list[int]
    steps: int | None = None  # agent steps per run, or
    env_steps: int | None = None  # env steps per run (agent steps = env_steps / the task's action repeat)
    eval_every: int = 5000  # agent steps, as steps
    eval_episodes: int = 5
    perception: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, dict[str, float]] = field(default_factory=dict)
    final_evaluations: int = 1  # a run's final return: the mean of its last this many evaluations
    random_episodes: int = 10  # the random policy's reference row (0: none)
    compare: str | None = None  # the agent whose probability of improvement over each other agent is reported
    shared_prefix: bool = False  # online agents: one random-action prefix + first fit per task, shared by the seeds
    exclude: list[str] = field(default_factory=list)  # "task/agent" pairs the grid leaves out

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExperimentSpec":
        from kp_rl.envs import get_spec

        path = Path(path)
        data = read_yaml(path, "experiment spec")
        required = {"tasks", "agents", "seeds"}
        if not isinstance(data, dict) or not required <= set(data) or ("steps" in data) == ("env_steps" in data):
            raise ValueError(f"{path}: an experiment spec needs {sorted(required)} and one of steps / env_steps")
        if unknown := set(data) - {f.name for f in fields(cls)}:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}")
        counts = {k: int(data[k]) for k in ("eval_every", "eval_episodes", "final_evaluations", "random_episodes")
                  if k in data}
        spec = cls(**{"name": path.stem, **data, **counts, "tasks": list(data["tasks"]),
                      "agents": list(data["agents"]), "seeds": [int(s) for s in data["seeds"]],
                      "perception": {**PERCEPTION_DEFAULTS, **(data.get("perception") or {})},
                      "resources": _resources(path, data.get("resources") or {}),
                      "shared_prefix": bool(data.get("shared_prefix", False)),
                      "exclude": list(data.get("exclude") or [])})
        if stray := set(spec.exclude) - {f"{t}/{a}" for t in spec.tasks for a in spec.agents}:
            raise ValueError(f"{path}: exclude: {sorted(stray)} are not task/agent pairs of the grid")
        if spec.compare is not None and spec.compare not in spec.agents:
            raise ValueError(f"{path}: compare: {spec.compare!r} is not one of the agents {spec.agents}")
        for task in spec.tasks:
            get_spec(task)  # unknown task -> clear error before any work
        for agent in spec.agents:
            get_agent(agent)
        return spec

    def agent_steps(self, task: str) -> int:
        from kp_rl.envs import get_spec

        return int(self.steps) if self.steps else int(self.env_steps) // get_spec(task).action_repeat

    def agents_for(self, task: str) -> list[str]:
        return [a for a in self.agents if f"{task}/{a}" not in self.exclude]

    def cells(self) -> list[tuple[str, str, int]]:
        return [(t, a, s) for t in self.tasks for a in self.agents_for(t) for s in self.seeds]

    def resources_for(self, what: str) -> dict[str, float]:
        """``{"cpus": c, "gpus": g}`` one Ray task of ``what`` (an agent name or ``perception``) asks for."""
        fallback = "perception" if what == "perception" else "default"
        return {**RESOURCE_DEFAULTS[fallback], **self.resources.get(fallback, {}), **self.resources.get(what, {})}


def _resources(path: Path, data: Any) -> dict[str, dict[str, float]]:
    """Validate a spec's ``resources:`` mapping (name -> {cpus, gpus}, non-negative numbers)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: resources must map agent names / default / perception to {{cpus, gpus}}")
    out: dict[str, dict[str, float]] = {}
    for name, need in data.items():
        if not isinstance(need, dict) or set(need) - {"cpus", "gpus"} or not all(
                isinstance(v, (int, float)) and v >= 0 for v in need.values()):
            raise ValueError(f"{path}: resources.{name} must be {{cpus: N, gpus: N}} with N >= 0, got {need!r}")
        out[str(name)] = {k: float(v) for k, v in need.items()}
    return out


PREFIXES = "prefixes"  # in a grid's results folder: the online agents' shared prefixes (episodes, first fit), committed


def cell_dir(runs_dir: Path, task: str, agent: str, seed: int) -> Path:
    """The run directory of one (task, agent, seed) cell."""
    return Path(runs_dir) / task / agent / f"seed{seed}"


def perception_models(spec: ExperimentSpec, task: str, data_root: Path, runs: Path,
                      progress: bool = True, device: str = "auto", *, prefixes: Path) -> dict[str, Path]:
    """Collect the task's data and train the models its agents need; returns run name (keypoints-dyn, ...) -> path.

    The online agents' shared prefixes go to ``prefixes/<task>/<agent>-prefix``: the grid runners put them beside
    the committed cells (:data:`PREFIXES`), so every seed of a grid starts from the same one on any machine.
    """
    from kp_rl.config import get_preset
    from kp_rl.data import collect
    from kp_rl.train import train_autoencoder, train_dynamics

    paths: dict[str, Path] = {}
    if spec.shared_prefix:  # online agents: the prefix every seed starts from (kp_rl.online.shared_prefix)
        from kp_rl.online import shared_prefix

        for agent in spec.agents_for(task):
            agent_spec = get_agent(agent)
            if agent_spec.schedule is not None:
                paths[f"{agent}-prefix"] = shared_prefix(
                    agent_spec.schedule, task, "cnn" if agent_spec.observation == "cnn-vrnn" else "keypoints",
                    agent_spec.observation != "keypoints", prefixes / task / f"{agent}-prefix", progress)
    autoencoders = {models_needed(a)[0] for a in spec.agents_for(task) if models_needed(a)}
    if not autoencoders:
        return paths
    p = spec.perception
    data = data_root / task
    collect(task, data, int(p["episodes"]), seed=0, workers=2, progress=progress)
    config = get_preset(p["preset"]).replace(train={"steps": int(p["autoencoder_steps"]),
                                                   "dynamics_steps": int(p["dynamics_steps"])})
    for representation in sorted(autoencoders, key=("keypoints", "cnn").index):
        ae = train_autoencoder(data, runs / "models" / task / representation, config, representation,
                               device=device, progress=progress)
        paths[representation] = ae
        paths[f"{representation}-dyn"] = train_dynamics(ae, data, runs / "models" / task / f"{representation}-dyn",
                                                         device=device, progress=progress)
    return paths


def models_needed(agent: str) -> tuple[str, ...]:
    """The perception models (run folders under ``models/<task>/``) an agent's observations need, last = its own;
    none for an agent with a perception schedule (it learns perception from its own steps, counted)."""
    spec = get_agent(agent)
    return () if spec.perception is not None else MODELS_FOR_OBSERVATION.get(spec.observation, ())


def model_for(agent: str, models: dict[str, Path]) -> Path | None:
    """The model an agent's cell runs on; for an online agent, its shared prefix (if the grid made one)."""
    needed = models_needed(agent)
    return models.get(needed[-1]) if needed else models.get(f"{agent}-prefix")


def run_cell(spec: ExperimentSpec, task: str, agent: str, seed: int, model: Path | None, runs: Path,
             progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Train one cell's agent (resumes an unfinished run; a finished one returns its curve at once). The cell's
    folder records what it holds (:mod:`kp_rl.runs`), so a cell never resumes another agent's or model's run.
    It checkpoints at every evaluation, so a stopped session loses only the steps since the last one; its curve
    records the machine it finished on (its seconds are that machine's)."""
    from kp_rl.agents import train_agent
    from kp_rl.envs import get_spec

    out = cell_dir(runs, task, agent, seed)
    online = get_agent(agent).perception is not None  # ``model`` is then its shared prefix (or None)
    return train_agent(get_spec(task).env_id, agent, spec.agent_steps(task), out, seed=seed,
                       model=None if online else model, perception_prefix=model if online else None,
                       eval_every=spec.eval_every, eval_episodes=spec.eval_episodes, checkpoint_every=spec.eval_every,
                       device=device, progress=progress)


def cell_result(results_dir: Path, task: str, agent: str, seed: int | None = None) -> Path:
    """A finished cell's committed result: ``cells/<task>/<agent>/seed<s>.json`` (``random.json`` for the random
    policy's row), so a grid resumes on another machine without rerunning it."""
    folder = Path(results_dir) / "cells" / task
    return folder / "random.json" if seed is None else folder / agent / f"seed{seed}.json"


def committed_curve(results_dir: Path, spec: ExperimentSpec, task: str, agent: str, seed: int) -> dict[str, Any] | None:
    """The committed curve of a cell that finished this spec's budget, else None."""
    from kp_rl.agents import _finished

    path = cell_result(results_dir, task, agent, seed)
    curve = read_json(path) if path.is_file() else None
    return curve if _finished(curve, spec.agent_steps(task)) else None


def finished_cells(spec: ExperimentSpec, task: str, out: Path, runs_dir: Path
                   ) -> tuple[dict[tuple[str, str, int], dict[str, Any]], list[tuple[str, int]]]:
    """A task's finished cells' curves and its ``(agent, seed)`` cells still to run. A cell is finished when its
    result is committed, or when its run folder finished the budget (its result, not yet committed, is written)."""
    from kp_rl.agents import finished_curve

    curves, todo = {}, []
    for agent in spec.agents_for(task):
        for seed in spec.seeds:
            curve = committed_curve(out, spec, task, agent, seed)
            if curve is None:
                curve = finished_curve(cell_dir(runs_dir, task, agent, seed), spec.agent_steps(task))
                if curve is not None:  # finished in its run folder but never committed
                    write_json(cell_result(out, task, agent, seed), curve)
            if curve is None:
                todo.append((agent, seed))
            else:
                curves[(task, agent, seed)] = curve
    return curves, todo


def random_policy(task: str, episodes: int, seed: int = 0) -> dict[str, Any]:
    """Returns of the uniform random policy on ``task`` (the reference row of a grid)."""
    import gymnasium as gym

    from kp_rl.envs import get_spec

    env = gym.make(get_spec(task).env_id)
    env.action_space.seed(seed)
    returns = []
    try:
        for episode in range(episodes):
            env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
                total, done = total + float(reward), terminated or truncated
            returns.append(total)
    finally:
        env.close()
    std = float(np.std(returns, ddof=1)) if len(returns) > 1 else 0.0
    return {"task": task, "returns": returns, "mean": float(np.mean(returns)), "std": std, "episodes": episodes,
            "seed": seed}


def run_experiment(path: str | Path, runs: str | Path = "runs", data: str | Path = "data",
                   results: str | Path = "results", progress: bool = True, device: str = "auto") -> dict[str, Any]:
    """Run every cell of a spec locally (finished cells are skipped) and summarise the results.

    ``device`` is where the perception models train and the agents run (``auto``: a GPU when there is one).
    """
    from kp_rl.model import resolve_device

    device = str(resolve_device(device))
    spec = ExperimentSpec.from_yaml(path)
    runs_dir = Path(runs) / spec.name
    curves: dict[tuple[str, str, int], dict[str, Any]] = {}
    out = Path(results) / spec.name
    for task in spec.tasks:
        finished, todo = finished_cells(spec, task, out, runs_dir)
        curves.update(finished)
        models = perception_models(spec, task, Path(data), runs_dir, progress, device=device,
                                   prefixes=out / PREFIXES) if todo else {}
        for agent, seed in todo:
            curve = run_cell(spec, task, agent, seed, model_for(agent, models), runs_dir, progress, device=device)
            write_json(cell_result(out, task, agent, seed), curve)
            curves[(task, agent, seed)] = curve
    return summarise(spec, curves, out, runs_dir)


def _bootstrap(scores: Any, statistic: Callable, reps: int, seed: int) -> tuple[float, float, float]:
    """rliable's point estimate and 95% stratified-bootstrap CI of ``statistic`` over ``scores``; the same for the
    same scores whatever ran before (rliable 1.2 draws its resamples from NumPy's global generator, whatever
    ``random_state`` says: it is seeded here and restored after)."""
    from rliable import library as rly

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        point, interval = rly.get_interval_estimates({"x": scores}, statistic, reps=reps,
                                                     random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(state)
    return float(np.squeeze(point["x"])), float(np.squeeze(interval["x"][0])), float(np.squeeze(interval["x"][1]))


def iqm_with_ci(scores: np.ndarray, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Interquartile mean and its 95% stratified-bootstrap CI (rliable) of a (runs,) or (runs, tasks) array."""
    from rliable import metrics

    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[:, None] if scores.ndim == 1 else scores
    return _bootstrap(scores, lambda x: np.array([metrics.aggregate_iqm(x)]), reps, seed)


def bootstrap_ci(values: list[np.ndarray], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap CI of the mean over strata: each stratum (a task's per-seed values) is resampled
    on its own, the statistic is the mean over strata of their means (one stratum: a plain bootstrap)."""
    rng = np.random.default_rng(seed)
    stats = np.zeros(resamples)
    for stratum in values:
        stratum = np.asarray(stratum, float)
        stats += stratum[rng.integers(0, len(stratum), (resamples, len(stratum)))].mean(1) / len(values)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def perception_minutes(runs_dir: Path, task: str) -> dict[str, float]:
    """Training minutes of each perception model a grid trained for ``task`` (``{}`` when none)."""
    from kp_rl.train import training_seconds

    return {history.parent.name: training_seconds(read_json(history)) / 60.0
            for history in sorted((Path(runs_dir) / "models" / task).glob("*/history.json"))}


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int = 2000,
                               seed: int = 0) -> tuple[float, float, float]:
    """P(a run of x beats a run of y), averaged over tasks, with its 95% stratified-bootstrap CI (rliable);
    ``x`` and ``y`` are ``(runs, tasks)`` final returns."""
    from rliable import metrics

    return _bootstrap((np.asarray(x, np.float64), np.asarray(y, np.float64)), metrics.probability_of_improvement,
                      reps, seed)


def _improvement(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    point, low, high = probability_of_improvement(x, y)
    return {"point": point, "ci": [low, high]}


def summarise(spec: ExperimentSpec, curves: dict[tuple[str, str, int], dict[str, Any]], out: Path,
              runs_dir: Path | None = None) -> dict[str, Any]:
    """``summary[task][agent]``: IQM of the final returns with its 95% CI, seeds, env steps (every step counted:
    the agent's, and the random-policy episodes of a perception model trained before it), wall-clock; the random
    policy's row; the ``compare`` agent's probability of improvement over each other agent; curves against env
    steps and against wall-clock; ``machines``: how many of an agent's cells ran on which machine. Writes
    ``out/results.json`` and the figures.

    With ``runs_dir`` (the grid's run folder) each task also gets the training minutes of the perception models
    trained before the agents (``perception_minutes``), added to the wall-clock of the agents that use them.
    """
    from matplotlib.figure import Figure

    from kp_rl.bench import machine, machine_label
    from kp_rl.envs import get_spec

    summary: dict[str, Any] = {task: {} for task in spec.tasks}
    finals: dict[str, dict[str, list[float]]] = {task: {} for task in spec.tasks}
    perception = {task: perception_minutes(runs_dir, task) if runs_dir is not None else {} for task in spec.tasks}
    for task in spec.tasks:
        task_spec = get_spec(task)
        for agent in spec.agents_for(task):
            runs = [curves[(task, agent, s)] for s in spec.seeds]
            finals[task][agent] = [float(np.mean(r["returns"][-spec.final_evaluations:])) for r in runs]
            iqm, low, high = iqm_with_ci(np.array(finals[task][agent]))
            needed = models_needed(agent)
            pretrained_steps = int(spec.perception["episodes"]) * task_spec.episode_steps if needed else 0
            fits = [r.get("perception_fits", []) for r in runs]
            summary[task][agent] = {
                "iqm": iqm, "ci": [low, high], "seeds": list(spec.seeds), "final_returns": finals[task][agent],
                "agent_steps": spec.agent_steps(task),
                "env_steps": spec.agent_steps(task) * task_spec.action_repeat + pretrained_steps,
                "pretrained_perception_env_steps": pretrained_steps,
                # the agent's own seconds (its refits included), the models trained before it, a shared first fit
                "wall_clock_s": float(np.mean([r["seconds"][-1] + sum(f["seconds"] for f in fit if f.get("shared"))
                                               for r, fit in zip(runs, fits)]))
                + 60 * sum(perception[task].get(n, 0.0) for n in needed),
                "machines": dict(Counter(machine_label(r.get("machine")) for r in runs)),
                "perception_fits": len(fits[0]) if fits else 0,
                "perception_fit_s": float(np.mean([sum(f["seconds"] for f in fit) for fit in fits]))}
        if spec.random_episodes:
            path = cell_result(out, task, "random")
            row = read_json(path) if path.is_file() else None
            if row is None or row["episodes"] != spec.random_episodes:
                row = random_policy(task, spec.random_episodes)
                write_json(path, row)
            summary[task]["random"] = {k: row[k] for k in ("mean", "std", "episodes")}
    if spec.compare is not None and len(spec.seeds) > 1:
        summary["probability_of_improvement"] = {}
        for other in (a for a in spec.agents if a != spec.compare):
            tasks = [t for t in spec.tasks if spec.compare in finals[t] and other in finals[t]]
            if not tasks:
                continue
            x = np.array([finals[t][spec.compare] for t in tasks]).T  # (runs, tasks)
            y = np.array([finals[t][other] for t in tasks]).T
            row = {**_improvement(x, y), "tasks": tasks}
            if len(tasks) > 1:  # each task's own, beside the average over tasks
                row["per_task"] = {t: _improvement(x[:, [i]], y[:, [i]]) for i, t in enumerate(tasks)}
            summary["probability_of_improvement"][f"{spec.compare} > {other}"] = row
    print(f"\n{'task':20s} {'agent':24s} {'IQM return':>11s} {'95% CI':>17s} {'env steps':>10s} {'min/run':>8s}")
    for task in spec.tasks:
        for agent, row in summary[task].items():
            if agent == "random":
                print(f"{task:20s} {'random policy':24s} {row['mean']:11.1f} {'':17s}")
                continue
            print(f"{task:20s} {agent:24s} {row['iqm']:11.1f} [{row['ci'][0]:7.1f},{row['ci'][1]:7.1f}] "
                  f"{row['env_steps']:10d} {row['wall_clock_s'] / 60:8.1f}")
    for pair, row in summary.get("probability_of_improvement", {}).items():
        per_task = row.get("per_task", {}).items()
        print(f"P({pair}) = {row['point']:.2f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]"
              + "".join(f"; {t}: {r['point']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" for t, r in per_task))
    summary = {"spec": spec.__dict__, "summary": summary, "perception_minutes": perception, "machine": machine(),
               "curves": {f"{t}/{a}/seed{s}": c for (t, a, s), c in curves.items()}}
    write_json(out / "results.json", summary)
    for axis in ("steps", "seconds"):
        fig = Figure(figsize=(4.5 * len(spec.tasks), 3.2))
        axes = fig.subplots(1, len(spec.tasks), squeeze=False)
        for ax, task in zip(axes[0], spec.tasks):
            for i, agent in enumerate(spec.agents):
                if agent not in spec.agents_for(task):
                    continue
                runs = [curves[(task, agent, s)] for s in spec.seeds]
                length = min(len(r["returns"]) for r in runs)
                scale = 1 / 60.0 if axis == "seconds" else get_spec(task).action_repeat  # minutes / env steps
                x = np.mean([r[axis][:length] for r in runs], axis=0) * scale
                y = np.array([r["returns"][:length] for r in runs])
                ax.plot(x, y.mean(0), label=agent, color=f"C{i}")
                ax.fill_between(x, y.min(0), y.max(0), color=f"C{i}", alpha=0.2)
            ax.set_title(task, fontsize=9)
            ax.set_xlabel("env steps (agent steps x action repeat)" if axis == "steps"
                          else "wall-clock minutes (agent training + evaluation)")
            ax.set_ylabel("eval return (mean; band: min-max over seeds)")
        axes[0][0].legend(fontsize=7)
        save_figure(fig, out / f"curves_{axis}.png")
    print(f"wrote {out}/results.json, curves_steps.png, curves_seconds.png")
    return summary
