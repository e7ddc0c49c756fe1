"""The kp-rl command: collect, inspect, train, eval, rl, run, demo, catalog.

Every sub-command prints a one-line ``kp-rl: error: ...`` and exits with status 2 on bad input, and removes
the output folders it created when it fails before its work starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions reported as one-line errors; the Ray runner's (a missing optional dependency, cells that failed
    after retries) once that module is imported (so ``kp-rl`` never imports Ray itself)."""
    grid = sys.modules.get("kp_rl.ray_grid")
    return ((ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
             IsADirectoryError) + ((grid.MissingDependencyError, grid.CellFailedError) if grid else ()))


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

    print(json.dumps(dataset_summary(args.data, args.out), indent=2))


def _config(args: argparse.Namespace):
    """The autoencoder's config: the explicit --preset / --config, else the resumed run's, else the cpu preset;
    then the explicit --steps / --batch-size / --seed (a resume refuses any of them that the run cannot honour)."""
    from kp_rl.config import Config, get_preset, load_config
    from kp_rl.model import read_checkpoint

    if args.config:
        config = load_config(args.config, base=args.preset)
    elif args.preset:
        config = get_preset(args.preset)
    elif (Path(args.out) / "model.pt").is_file():
        config = Config.from_dict(read_checkpoint(Path(args.out))["config"])
    else:
        config = get_preset("cpu")
    train = {k: v for k, v in {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size}.items()
             if v is not None}
    return config.replace(train=train) if train else config


def _dynamics_overrides(args: argparse.Namespace) -> tuple[dict, str | None]:
    """Config overrides of the dynamics stage from the explicit flags, and the preset asked for (if any)."""
    from kp_rl.config import read_config_file

    overrides: dict = {}
    preset = args.preset
    if args.config:
        data = read_config_file(args.config)
        if preset is not None and data.get("preset", preset) != preset:
            raise ValueError(f"{args.config} sets preset {data['preset']!r}, but --preset {preset} was given")
        preset = data.pop("preset", preset)
        overrides = {section: dict(values or {}) for section, values in data.items()}
    train = {k: v for k, v in {"dynamics_steps": args.steps, "seed": args.seed,
                               "dynamics_batch_size": args.batch_size}.items() if v is not None}
    if train:
        overrides["train"] = {**overrides.get("train", {}), **train}
    if args.ablation:
        overrides["dynamics"] = {**overrides.get("dynamics", {}), **ABLATIONS[args.ablation]}
    return overrides, preset


_STREAMING = {"auto": None, "on": True, "off": False}
ABLATIONS = {"no-best-of-many": {"best_of_many": False}, "deterministic": {"stochastic": False}}


def _train(args: argparse.Namespace) -> None:
    from kp_rl.train import train_autoencoder, train_dynamics

    if args.what in ("keypoints", "cnn"):
        for flag, value in (("--keypoints", args.keypoints), ("--ablation", args.ablation)):
            if value:
                raise ValueError(f"{flag} is for train dynamics, not train {args.what}")
        path = train_autoencoder(args.data, args.out, _config(args), representation=args.what, device=args.device,
                                 progress=not args.quiet, streaming=_STREAMING[args.streaming])
    else:
        if not args.keypoints and not (Path(args.out) / "model.pt").is_file():
            raise ValueError("train dynamics needs --keypoints RUN (a trained keypoints or cnn run)")
        overrides, preset = _dynamics_overrides(args)
        path = train_dynamics(args.keypoints, args.data, args.out, overrides or None, device=args.device,
                              progress=not args.quiet, streaming=_STREAMING[args.streaming], preset=preset)
    print(f"saved {path}")


def _env_id(name: str) -> str:
    """A catalog task's id, or a registered Gymnasium id (Shimmy's ``dm_control/...`` registered on demand)."""
    import gymnasium as gym

    from kp_rl.envs import get_spec

    if "/" not in name or name.startswith("kp_rl/"):
        return get_spec(name).env_id
    if name not in gym.registry and name.startswith("dm_control/"):
        try:
            import shimmy

            gym.register_envs(shimmy)
        except ImportError as exc:
            raise ValueError(f"{name} is a Shimmy id: pip install 'shimmy[dm-control]' packaging ({exc})") from exc
    if name not in gym.registry:
        raise ValueError(f"unknown env id {name!r}: a catalog task (kp-rl catalog envs) or a registered Gymnasium id")
    return name


def _rl(args: argparse.Namespace) -> None:
    from kp_rl.agents import train_agent

    env_id = _env_id(args.env)
    curve = train_agent(env_id, args.agent, args.steps, args.out, seed=args.seed, model=args.model,
                        eval_every=args.eval_every, eval_episodes=args.eval_episodes, device=args.device,
                        progress=not args.quiet)
    print(f"{curve['agent']} on {env_id}: final eval return {curve['returns'][-1]:.1f} after {curve['steps'][-1]} "
          f"steps ({curve['seconds'][-1] / 60:.1f} min); curve in {Path(args.out) / 'curve.json'}")


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
    print(f"reconstruction error (held-out, per frame): {rec['model']:.3f}  "
          f"(mean-frame baseline {rec['mean_frame']:.3f})")
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


def _catalog(args: argparse.Namespace) -> None:
    from kp_rl.agents import load_agent_catalog
    from kp_rl.envs import load_catalog

    if args.which in ("envs", "all"):
        print(f"{'env id':36s} {'action repeat':>13s} {'image':>5s}  tracked objects beyond the bodies")
        for env_id, spec in load_catalog().items():
            print(f"{env_id:36s} {spec.action_repeat:13d} {spec.image_size:5d}  {', '.join(spec.objects) or '-'}")
    if args.which == "all":
        print()
    if args.which in ("agents", "all"):
        print(f"{'agent':24s} {'algo':4s} {'observation':17s} {'--model':11s} {'augmentation':13s} "
              f"{'stack, envs':12s} perception without --model")
        for name, spec in load_agent_catalog().items():
            model = "-" if spec.model == "none" else spec.model
            augmentation = "-" if spec.augmentation == "none" else spec.augmentation
            schedule = spec.schedule
            online = (f"online: prefix {schedule.prefix}, refit every {schedule.refit_every} ({schedule.preset})"
                      if schedule else "-" if model == "-" else "(--model required)")
            print(f"{name:24s} {spec.algo:4s} {spec.observation:17s} {model:11s} {augmentation:13s} "
                  f"{f'{spec.frame_stack}, {spec.n_envs}':12s} {online}")


DEMO_DEFAULTS = {False: {"out": "results/demo", "data": "data/demo-cartpole", "runs": "runs/demo"},
                 True: {"out": "results/demo-quick", "data": "data/demo-cartpole-quick", "runs": "runs/demo-quick"}}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other kp-rl error (``kp-rl: error: ...``, status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.split()[1:]  # 'kp-rl train' -> its help hint
        hint = f" (kp-rl {' '.join(command)} --help)" if command else " (kp-rl --help)"
        self.exit(2, f"kp-rl: error: {' '.join(message.split())}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kp-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    threads = _Parser(add_help=False)
    threads.add_argument("--threads", type=_positive_int, default=None,
                         help="torch CPU threads in every stage (default: per stage, as measured by "
                              "experiments/bench_threads.py: autoencoder training one per core, VRNN training and "
                              "agents 1, otherwise torch's one per core)")

    p = sub.add_parser("collect", help="collect random-policy rollouts into episode shards")
    p.add_argument("--env", required=True, help="task name or env id, e.g. cartpole-swingup (kp-rl catalog envs)")
    p.add_argument("--episodes", type=_positive_int, required=True, help="episodes the dataset should hold")
    p.add_argument("--out", required=True, help="dataset folder (resumes a partial collection of the same settings)")
    p.add_argument("--policy", default="random", choices=["random"], help="behaviour policy (default: random)")
    p.add_argument("--workers", type=_positive_int, default=1, help="parallel worker processes (default: 1)")
    p.add_argument("--seed", type=_seed, default=0, help="collection seed; episode i gets its own (default: 0)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="cut episodes to this many agent steps (default: whole episodes)")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="frame size in pixels (default: the catalog's, 64)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_collect, outputs=("out",))

    p = sub.add_parser("inspect", help="print what a dataset holds and plot sample frames")
    p.add_argument("data", help="dataset folder")
    p.add_argument("--out", default=None, help="folder for summary.json and frames.png (default: print only)")
    p.set_defaults(func=_inspect, outputs=("out",))

    p = sub.add_parser("train", parents=[threads],
                       help="train a keypoint / CNN autoencoder, or dynamics on a trained one")
    p.add_argument("what", choices=["keypoints", "cnn", "dynamics"], help="the stage to train")
    p.add_argument("--data", required=True, help="dataset folder (kp-rl collect)")
    p.add_argument("--out", required=True,
                   help="run folder: model.pt, history.json, run.json, tb/ (resumes the run it holds, if the same)")
    p.add_argument("--keypoints", help="dynamics only: the trained keypoints (or cnn) run to build on (required "
                                       "for a new run; default on a resume: the recorded one, which a given one "
                                       "must match)")
    p.add_argument("--preset", default=None, choices=["cpu", "paper", "tiny"],
                   help="model and training sizes (default: cpu; a resumed run's own; dynamics: the autoencoder's)")
    p.add_argument("--config", help="YAML with a preset and section overrides (default: none)")
    p.add_argument("--steps", type=_positive_int,
                   help="training steps of this stage (default: the preset's); a bigger value extends a finished run")
    p.add_argument("--batch-size", type=_positive_int,
                   help="sequences per batch of this stage (default: the preset's: train.batch_size, "
                        "dynamics: train.dynamics_batch_size)")
    p.add_argument("--seed", type=_seed, help="training seed (default: the preset's, 0)")
    p.add_argument("--ablation", choices=list(ABLATIONS), help="dynamics only: train an ablation (default: none)")
    p.add_argument("--streaming", choices=list(_STREAMING), default="auto",
                   help="read episodes from disk on demand instead of loading the dataset into memory "
                        "(default: auto, streaming above 250k frames)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, a GPU if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train, outputs=("out",))

    p = sub.add_parser("eval", parents=[threads], help="evaluate a trained model on a dataset's held-out episodes")
    p.add_argument("--model", required=True, help="checkpoint or run folder")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--out", help="folder for eval.json (and video_prediction.gif/png with dynamics) "
                                 "(default: print only)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.set_defaults(func=_eval, outputs=("out",))

    p = sub.add_parser("rl", parents=[threads], help="train an SB3 agent from the agents/ catalog, with evaluation")
    p.add_argument("--env", required=True,
                   help="task name or env id with pixel observations (kp-rl catalog envs; or e.g. dm_control/... "
                        "of Shimmy)")
    p.add_argument("--agent", required=True,
                   help="catalog name (kp-rl catalog agents, e.g. sac-keypoints-belief) or a YAML file")
    p.add_argument("--steps", type=_positive_int, required=True,
                   help="agent steps (env steps / action repeat); a bigger value extends a finished run")
    p.add_argument("--out", required=True,
                   help="run folder: curve.json, agent.zip, run.json, tb/ (resumes the run it holds, if the same)")
    p.add_argument("--model", help="kp-rl run or pretrained:<task> for keypoints / cnn-vrnn agents (default: "
                                   "none: agents with a perception schedule learn it from their own steps; on a "
                                   "resume, the recorded one)")
    p.add_argument("--seed", type=_seed, default=None, help="agent and env seed (default: 0; on a resume, the run's)")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="evaluate every this many agent steps, and at the end (default: 5000; on a resume, the run's)")
    p.add_argument("--eval-episodes", type=_positive_int, default=None,
                   help="episodes per evaluation, deterministic policy (default: 5; on a resume, the run's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_rl, outputs=("out",))

    p = sub.add_parser("run", parents=[threads],
                       help="run an experiment grid (tasks x agents x seeds) from a YAML spec")
    p.add_argument("spec", help="experiments/<name>.yaml")
    p.add_argument("--runs", default="runs", help="folder of the grid's run folders, under <runs>/<name>/ "
                                                  "(default: runs)")
    p.add_argument("--data", default="data", help="folder of the datasets, one per task (default: data)")
    p.add_argument("--results", default="results",
                   help="folder of the results: <results>/<name>/results.json and plots (default: results)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the cells as Ray tasks: on a new local Ray instance, or on the cluster at ADDRESS "
                        "(auto, ray://host:10001); needs kp_rl[ray] (default: no Ray, cells run one by one)")
    p.add_argument("--ray-cpus", type=_positive_int, default=None,
                   help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--ray-retries", type=_seed, default=2, help="retries of a cell whose worker died (default: 2)")
    p.add_argument("--device", default=None,
                   help="local runs: where perception trains and agents run (default: auto, a GPU if any)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run, outputs=("runs", "data", "results"))

    p = sub.add_parser("demo", parents=[threads], help="the embedded end-to-end demo on cartpole-swingup")
    full, quick = DEMO_DEFAULTS[False], DEMO_DEFAULTS[True]
    p.add_argument("--out", default=None, help=f"results page and figures (default: {full['out']}; "
                                               f"--quick: {quick['out']})")
    p.add_argument("--data", default=None, help=f"dataset folder (default: {full['data']}; --quick: {quick['data']})")
    p.add_argument("--runs", default=None, help=f"run folders of the trained models and the agent "
                                                f"(default: {full['runs']}; --quick: {quick['runs']})")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (its own default folders)")
    p.set_defaults(func=_demo, outputs=("out", "data", "runs"))

    p = sub.add_parser("catalog", help="list the task and agent catalogs (envs/*.yaml, agents/*.yaml)")
    p.add_argument("which", nargs="?", choices=["envs", "agents", "all"], default="all",
                   help="which catalog to list (default: all)")
    p.set_defaults(func=_catalog, outputs=())
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _missing_root(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what a command would create), else None."""
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        for name, default in DEMO_DEFAULTS[args.quick].items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    if getattr(args, "threads", None):
        from kp_rl.train import set_threads

        set_threads(args.threads)
    outputs = [Path(getattr(args, name)) for name in args.outputs if getattr(args, name, None)]
    created: list[Path] = []
    try:
        from kp_rl.runs import check_output_dir

        for path in outputs:
            check_output_dir(path)
        created = [root for root in map(_missing_root, outputs) if root is not None]
        args.func(args)
    except _user_errors() as exc:
        for root in created:  # a folder tree this command made and left without a file: it failed before its work
            if root.is_dir() and not any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
                shutil.rmtree(root, ignore_errors=True)
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"kp-rl: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kp-rl: interrupted; finished work is kept and the command resumes where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
