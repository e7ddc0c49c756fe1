"""Structured vs unstructured agents at 100k env steps: SAC on keypoints + VRNN belief vs the unstructured CNN-VRNN
vs pixels (DrQ-style augmentation) vs the true state, every env step counted.

The keypoint and CNN-VRNN agents learn perception from their own steps (kp_rl.online: a random-action prefix
shared by a task's seeds, then refits on the replay data); their budget includes every frame perception saw.
The grid is a spec in this folder (tasks x agents x seeds x budget); this script is `kp-rl run SPEC` plus the
report:

    python experiments/structured_vs_unstructured.py --ray         # cpu spec, two cells at a time (~10-12 h, 2 cores)
    python experiments/structured_vs_unstructured.py --spec gpu --ray
    python experiments/structured_vs_unstructured.py --report-only # the committed cells -> README, results.json

Finished cells are committed under results/<spec name>/cells/ and never rerun, and so are the online agents'
shared prefixes (random-action episodes and first fit, a few MB each) under prefixes/: every seed of a task
starts from the same one, on any machine. Writes results/<spec name>/
{results.json, README.md, curves_steps.png, curves_seconds.png} and, per task, keypoints_<task>.png (the keypoints
the seed-0 keypoint agent saw at the end of its run). The README sets the IQM of our final returns beside the
published 100k figures (PUBLISHED below, named as such).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Published returns at 100k env steps (mean ± std over seeds, as printed): CURL, pixel SAC and state SAC from the
# CURL paper (Srinivas, Laskin, Abbeel 2020, Table 1, "100K step scores"; pixel SAC finger-spin read from a text
# copy), DrQ from the DrQ paper (Kostrikov, Yarats, Fergus 2020, Table 1, 100k, K=2, M=2). Other protocols,
# networks and action repeats than ours: a reference level, not a paired comparison.
PUBLISHED = {
    "DrQ": {"finger-spin": "901±104", "cartpole-swingup": "759±92", "reacher-easy": "601±213", "cheetah-run": "344±67",
            "walker-walk": "612±164", "ball_in_cup-catch": "913±53"},
    "CURL": {"finger-spin": "767±56", "cartpole-swingup": "582±146", "reacher-easy": "538±233", "cheetah-run": "299±48",
             "walker-walk": "403±24", "ball_in_cup-catch": "769±43"},
    "pixel SAC": {"finger-spin": "179±66", "cartpole-swingup": "419±40", "reacher-easy": "145±30",
                  "cheetah-run": "197±15", "walker-walk": "42±12", "ball_in_cup-catch": "312±63"},
    "state SAC": {"finger-spin": "811±46", "cartpole-swingup": "835±22", "reacher-easy": "746±25",
                  "cheetah-run": "616±18", "walker-walk": "891±82", "ball_in_cup-catch": "746±91"},
}
LABELS = {"sac-keypoints-belief": "keypoints + belief (online)", "sac-cnn-vrnn": "CNN-VRNN (online)",
          "sac-pixels-drq": "pixels + random shift", "sac-pixels": "pixels, no augmentation", "sac-state": "state (oracle)",
          "sac-keypoints": "keypoints (pre-trained, frozen)"}


def write_report(results_dir: Path, spec_path: Path) -> None:
    """results/<name>/README.md from results.json: our IQM [95% CI] per task and agent beside the published 100k
    figures, the random policy, the probabilities of improvement."""
    from kp_rl.experiment import ExperimentSpec
    from kp_rl.files import read_json
    from kp_rl.report import experiment_readme, markdown_table

    spec = ExperimentSpec.from_yaml(spec_path)
    results = read_json(results_dir / "results.json")
    summary = results["summary"]
    rows = []
    for task in spec.tasks:
        for agent, row in summary[task].items():
            if agent == "random":
                rows.append([task, "random policy", f"{row['mean']:.0f} ± {row['std']:.0f} ({row['episodes']} episodes)",
                             "", "", ""])
                continue
            rows.append([task, LABELS.get(agent, agent), f"{row['iqm']:.0f} [{row['ci'][0]:.0f}, {row['ci'][1]:.0f}]",
                         len(row["seeds"]), f"{row['env_steps']:,}", f"{row['wall_clock_s'] / 60:.0f}"])
        for method, scores in PUBLISHED.items():
            if task in scores:
                rows.append([task, f"*published: {method}*", scores[task], "", "100,000", ""])
    table = markdown_table(["task", "agent", "final return: IQM [95% CI]", "seeds", "env steps (all counted)",
                            "wall-clock min / run"], rows)
    pairs = "\n".join(f"- P({pair}) = {row['point']:.2f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}] over "
                      f"{', '.join(row['tasks'])}"
                      + "".join(f"; {t} alone {r['point']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
                                for t, r in row.get("per_task", {}).items())
                      for pair, row in summary.get("probability_of_improvement", {}).items())
    machines = "; ".join(f"{task} {LABELS.get(agent, agent)}: " + ", ".join(f"{n} on {label}" for label, n in
                                                                        row["machines"].items())
                         for task in spec.tasks for agent, row in summary[task].items()
                         if agent != "random" and len(row.get("machines", {})) > 1)
    missing = [f"{t}/{a}/seed{s}" for t, a, s in spec.cells() if f"{t}/{a}/seed{s}" not in results["curves"]]
    experiment_readme(results_dir, "experiments/structured_vs_unstructured.py", __doc__, f"""\
Spec `{spec.name}` ({spec_path.name}): {len(spec.cells())} cells, {len(spec.cells()) - len(missing)} finished.
Final return: the mean of the last {spec.final_evaluations} evaluation(s) of {spec.eval_episodes} episodes
(deterministic policy); IQM and 95% stratified-bootstrap CIs over seeds (rliable). Published figures are other
papers' means ± std at 100k env steps, set beside ours as a level, not a paired comparison.

{table}

Wall-clock is each run's own, on the machine that ran it (named in its cell file where recorded), so it compares agents
run on the same kind of machine only.{" Agents whose cells ran on different machines: " + machines + "." if machines else ""}

Probability of improvement (a seed of the first agent beats a seed of the second; rliable, 95% CI):

{pairs or '(needs two or more seeds)'}

![returns against env steps](curves_steps.png)
![returns against wall-clock](curves_seconds.png)""", results["machine"])


def keypoint_figures(spec_path: Path, runs: str, data: str, results: str) -> list[Path]:
    """keypoints_<task>.png for every task of the spec whose grid trained a keypoint model."""
    import kp_rl
    from kp_rl.data import episode_files, load_episode
    from kp_rl.experiment import ExperimentSpec, cell_result
    from kp_rl.report import keypoint_strip

    spec = ExperimentSpec.from_yaml(spec_path)
    written = []
    for task in spec.tasks:
        online = Path(runs) / spec.name / task / "sac-keypoints-belief" / "seed0" / "perception"
        if online.is_dir() and not cell_result(Path(results) / spec.name, task, "sac-keypoints-belief", 0).exists():
            continue  # a run in progress: its figure waits for the end of the run
        model_dir = online / "dynamics" if online.is_dir() else Path(runs) / spec.name / "models" / task / "keypoints"
        if not (model_dir / "model.pt").exists():
            continue
        episodes = episode_files(online / "episodes") if online.is_dir() else episode_files(Path(data) / task)
        frames = load_episode(episodes[-1], ["image"])["image"]
        path = Path(results) / spec.name / f"keypoints_{task}.png"
        keypoint_strip({"keypoints": kp_rl.load(model_dir)}, frames, path,
                       f"{task}: the keypoints the keypoint agent sees (its model and its own latest episode; "
                       f"opacity = mu)")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="cpu", help="cpu | gpu | a path to a spec YAML")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run the cells on Ray (a local instance, or the cluster at ADDRESS)")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--data", default="data")
    parser.add_argument("--results", default="results")
    parser.add_argument("--device", default="auto",
                        help="local runs: where perception trains and agents run (auto: a GPU if there is one)")
    parser.add_argument("--report-only", action="store_true", help="run nothing: summarise the committed cells")
    args = parser.parse_args()
    spec = HERE / f"structured_vs_unstructured_{args.spec}.yaml" if args.spec in ("cpu", "gpu") else Path(args.spec)
    if args.report_only:
        from kp_rl.experiment import ExperimentSpec, cell_result, committed_curve, summarise

        loaded = ExperimentSpec.from_yaml(spec)
        out = Path(args.results) / loaded.name
        curves = {c: committed_curve(out, loaded, *c) for c in loaded.cells()}
        missing = [c for c, curve in curves.items() if curve is None]
        if missing:
            print(f"{len(missing)} cells not finished (e.g. {cell_result(out, *missing[0])}); reporting the tasks "
                  f"and agents whose seeds are all done")
        loaded = _complete(loaded, curves)
        summarise(loaded, {c: v for c, v in curves.items() if v is not None}, out)
    elif args.ray is not None:
        from kp_rl.ray_grid import run_experiment_ray

        run_experiment_ray(spec, address=None if args.ray == "local" else args.ray, runs=args.runs, data=args.data,
                           results=args.results)
    else:
        from kp_rl.experiment import run_experiment

        run_experiment(spec, runs=args.runs, data=args.data, results=args.results, device=args.device)
    for path in keypoint_figures(spec, args.runs, args.data, args.results):
        print(f"wrote {path}")
    from kp_rl.experiment import ExperimentSpec

    write_report(Path(args.results) / ExperimentSpec.from_yaml(spec).name, spec)


def _complete(spec, curves):
    """The spec reduced to the (task, agent) pairs whose seeds have all finished."""
    import dataclasses

    exclude = [f"{t}/{a}" for t in spec.tasks for a in spec.agents_for(t)
               if any(curves[(t, a, s)] is None for s in spec.seeds)]
    return dataclasses.replace(spec, exclude=sorted(set(spec.exclude) | set(exclude)))


if __name__ == "__main__":
    main()
