"""The ``kp-rl`` command: ``collect | inspect | train | eval | rl | run | demo``.

Every sub-command prints a one-line ``kp-rl: error: ...`` and exits with status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, KeyError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """USER_ERRORS plus the Ray runner's (a missing optional dependency, cells that failed after retries), once
    that module is imported (evaluated when an exception is matched, so ``kp-rl`` never imports Ray itself)."""
    grid = sys.modules.get("kp_rl.ray_grid")
    return USER_ERRORS + ((grid.MissingDependencyError, grid.CellFailedError) if grid else ())


def _collect(args: argparse.Namespace) -> None:
    from kp_rl.data import collect

    env_kwargs = {"image_size": args.image_size} if args.image_size else {}
    manifest = collect(args.env, args.out, args.episodes, seed=args.seed, workers=args.workers,
                       policy=args.policy, max_steps=args.max_steps, env_kwargs=env_kwargs,
                       progress=not args.quiet)
    print(f"{manifest['num_episodes']} episodes, {manifest['num_frames']} frames of {manifest['env_id']} "
          f"in {args.out}")


def _inspect(args: argparse.Namespace) -> None:
    from kp_rl.report import dataset_summary

    summary = dataset_summary(args.data, args.out)
    print(json.dumps(summary, indent=2))


def _config(args: argparse.Namespace):
    from kp_rl.config import get_preset, load_config

    config = load_config(args.config, base=args.preset) if args.config else get_preset(args.preset)
    train = {k: v for k, v in {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size}.items()
             if v is not None}
    return config.replace(train=train) if train else config


_STREAMING = {"auto": None, "on": True, "off": False}


def _train(args: argparse.Namespace) -> None:
    from kp_rl.train import train_autoencoder, train_dynamics

    if args.what in ("keypoints", "cnn"):
        path = train_autoencoder(args.data, args.out, _config(args), representation=args.what, device=args.device,
                                 progress=not args.quiet, streaming=_STREAMING[args.streaming], threads=args.threads)
    else:
        if not args.keypoints:
            raise ValueError("train dynamics needs --keypoints RUN (a trained keypoints or cnn run)")
        overrides: dict = {}
        if args.steps is not None:
            overrides["train"] = {"dynamics_steps": args.steps}
        if args.seed is not None:
            overrides.setdefault("train", {})["seed"] = args.seed
        ablation = {"no-best-of-many": {"best_of_many": False}, "deterministic": {"stochastic": False}}
        if args.ablation:
            overrides["dynamics"] = ablation[args.ablation]
        path = train_dynamics(args.keypoints, args.data, args.out, overrides, device=args.device,
                              progress=not args.quiet, streaming=_STREAMING[args.streaming], threads=args.threads)
    print(f"saved {path}")


def _rl(args: argparse.Namespace) -> None:
    from kp_rl.agents import train_agent
    from kp_rl.envs import get_spec

    env_id = args.env if "/" in args.env and not args.env.startswith("kp_rl/") else get_spec(args.env).env_id
    curve = train_agent(env_id, args.agent, args.steps, args.out, seed=args.seed, model=args.model,
                        eval_every=args.eval_every, eval_episodes=args.eval_episodes, device=args.device,
                        progress=not args.quiet)
    print(f"{args.agent} on {env_id}: final eval return {curve['returns'][-1]:.1f} after {curve['steps'][-1]} steps "
          f"({curve['seconds'][-1] / 60:.1f} min); curve in {Path(args.out) / 'curve.json'}")


def _run(args: argparse.Namespace) -> None:
    if args.ray is not None:
        if args.device is not None:
            raise ValueError("--device is for local runs: with --ray each cell runs on a GPU when its resources "
                             "(the spec's resources: section) ask for one, else on the CPU")
        from kp_rl.ray_grid import run_experiment_ray

        run_experiment_ray(args.spec, address=None if args.ray == "local" else args.ray, runs=args.runs,
                           data=args.data, results=args.results, num_cpus=args.ray_cpus,
                           max_retries=args.ray_retries, progress=not args.quiet)
        return
    from kp_rl.experiment import run_experiment

    run_experiment(args.spec, runs=args.runs, data=args.data, results=args.results, progress=not args.quiet,
                   device=args.device or "auto")


def _eval(args: argparse.Namespace) -> None:
    from kp_rl.evaluate import evaluate

    report = evaluate(args.model, args.data, args.out, device=args.device)
    rec, track = report["reconstruction"], report["tracking"]
    print(f"reconstruction error (held-out, per frame): {rec['model']:.3f}  (mean-frame baseline {rec['mean_frame']:.3f})")
    print(f"tracking RMSE (held-out, linear from features): {track['keypoint_rmse_px']:.2f} px  "
          f"(mean-position baseline {track['mean_baseline_rmse_px']:.2f} px)")
    if "reward_prediction" in report:
        rp = report["reward_prediction"]
        print(f"reward prediction over the predicted steps: MSE {rp['prior_mean']['mse_mean']:.4f}, "
              f"R^2 {rp['prior_mean']['r2_mean']:.3f}  (mean-reward baseline MSE "
              f"{rp['mean_reward_baseline']['mse_mean']:.4f})")
    if args.out:
        print(f"wrote {Path(args.out) / 'eval.json'}")


def _demo(args: argparse.Namespace) -> None:
    from kp_rl.demo import run_demo

    run_demo(out=Path(args.out), data=Path(args.data), quick=args.quick, runs=Path(args.runs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kp-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=_positive_int, default=None,
                         help="torch CPU threads (default: per stage, measured: autoencoder training one per core, "
                              "VRNN training 1, otherwise torch's one per core); on a machine other jobs share, "
                              "1 avoids threads waiting for each other")

    p = sub.add_parser("collect", help="collect random-policy rollouts into episode shards")
    p.add_argument("--env", required=True, help="env id or task name, e.g. kp_rl/cartpole-swingup-v0")
    p.add_argument("--episodes", type=int, required=True, help="episodes the dataset should hold")
    p.add_argument("--out", required=True, help="dataset directory (resumes if it holds a partial collection)")
    p.add_argument("--policy", default="random", choices=["random"])
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="cut episodes to this many agent steps")
    p.add_argument("--image-size", type=int, default=None, help="override the catalog image size")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_collect)

    p = sub.add_parser("inspect", help="print what a dataset holds and plot sample frames")
    p.add_argument("data", help="dataset directory")
    p.add_argument("--out", default=None, help="directory for summary.json and frames.png")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("train", parents=[threads], help="train a keypoint / CNN autoencoder, or dynamics on a trained one")
    p.add_argument("what", choices=["keypoints", "cnn", "dynamics"])
    p.add_argument("--data", required=True, help="dataset directory (kp-rl collect)")
    p.add_argument("--out", required=True, help="run directory: model.pt, history.json, tb/ (resumes if present)")
    p.add_argument("--keypoints", help="dynamics only: the trained keypoints (or cnn) run to build on")
    p.add_argument("--preset", default="cpu", choices=["cpu", "paper", "tiny"])
    p.add_argument("--config", help="YAML with a preset and section overrides")
    p.add_argument("--steps", type=int, help="override the training steps of this stage")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--ablation", choices=["no-best-of-many", "deterministic"], help="dynamics ablations")
    p.add_argument("--streaming", choices=list(_STREAMING), default="auto",
                   help="read episodes from disk on demand instead of loading the dataset into memory "
                        "(auto: above 250k frames)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", parents=[threads], help="evaluate a trained model on a dataset's held-out episodes")
    p.add_argument("--model", required=True, help="checkpoint or run directory")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--out", help="directory for eval.json (and video_prediction.gif/png with dynamics)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_eval)

    p = sub.add_parser("rl", parents=[threads], help="train an SB3 agent from the agents/ catalog, with evaluation")
    p.add_argument("--env", required=True, help="env id or task name (pixel observations)")
    p.add_argument("--agent", required=True, help="catalog name (e.g. sac-keypoints-belief) or a YAML file")
    p.add_argument("--steps", type=int, required=True, help="agent steps")
    p.add_argument("--out", required=True, help="run directory (curve.json, agent.zip; resumes if present)")
    p.add_argument("--model", help="kp-rl run for keypoints / cnn-vrnn agents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=5000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_rl)

    p = sub.add_parser("run", parents=[threads], help="run an experiment grid (tasks x agents x seeds) from a YAML spec")
    p.add_argument("spec", help="experiments/<name>.yaml")
    p.add_argument("--runs", default="runs")
    p.add_argument("--data", default="data")
    p.add_argument("--results", default="results")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the cells as Ray tasks: on a new local Ray instance, or on the cluster at ADDRESS "
                        "(auto, ray://host:10001); needs kp_rl[ray]")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--ray-retries", type=int, default=2, help="retries of a cell whose worker died")
    p.add_argument("--device", default=None,
                   help="local runs: where perception trains and agents run (default auto: a GPU if there is one)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)

    p = sub.add_parser("demo", parents=[threads], help="the embedded end-to-end demo on cartpole-swingup")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--data", default="data/demo-cartpole")
    p.add_argument("--runs", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.set_defaults(func=_demo)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except _user_errors() as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"kp-rl: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kp-rl: interrupted; finished work is kept and the command resumes where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
