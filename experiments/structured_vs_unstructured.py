"""Structured vs unstructured agents: SAC on keypoints + VRNN belief vs SAC on pixels vs SAC on the true state.

The grid is a spec in this folder (tasks x agents x seeds x budget); this script is `kp-rl run SPEC` with the
spec chosen by name:

    python experiments/structured_vs_unstructured.py              # cpu spec: 3 tasks x 3 agents x 3 seeds, <= 3 h on 2 cores
    python experiments/structured_vs_unstructured.py --spec gpu   # the 100k-env-step pixel-DMC benchmark
    python experiments/structured_vs_unstructured.py --ray auto   # the same cells as Ray tasks on a cluster

It collects data and trains the perception models once per task, trains every cell (finished cells are skipped,
unfinished ones resume), prints IQM final returns with 95% stratified-bootstrap CIs (rliable) and writes
results/<spec name>/{results.json, curves_steps.png, curves_seconds.png} and, per task with a keypoint model,
keypoints_<task>.png (the keypoints those agents see, drawn on a random-policy episode).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent


def keypoint_figures(spec_path: Path, runs: str, data: str, results: str) -> list[Path]:
    """keypoints_<task>.png for every task of the spec whose grid trained a keypoint model."""
    import kp_rl
    from kp_rl.data import episode_files, load_episode
    from kp_rl.experiment import ExperimentSpec
    from kp_rl.report import keypoint_strip

    spec = ExperimentSpec.from_yaml(spec_path)
    written = []
    for task in spec.tasks:
        model_dir = Path(runs) / spec.name / "models" / task / "keypoints"
        if not (model_dir / "model.pt").exists():
            continue
        frames = load_episode(episode_files(Path(data) / task)[-1], ["image"])["image"]
        path = Path(results) / spec.name / f"keypoints_{task}.png"
        keypoint_strip({"keypoints": kp_rl.load(model_dir)}, frames, path,
                       f"{task}: the keypoints the keypoint agents see (a random-policy episode; opacity = mu)")
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
    args = parser.parse_args()
    spec = HERE / f"structured_vs_unstructured_{args.spec}.yaml" if args.spec in ("cpu", "gpu") else Path(args.spec)
    if args.ray is not None:
        from kp_rl.ray_grid import run_experiment_ray

        run_experiment_ray(spec, address=None if args.ray == "local" else args.ray, runs=args.runs, data=args.data,
                           results=args.results)
    else:
        from kp_rl.experiment import run_experiment

        run_experiment(spec, runs=args.runs, data=args.data, results=args.results, device=args.device)
    for path in keypoint_figures(spec, args.runs, args.data, args.results):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
