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


def _demo(args: argparse.Namespace) -> None:
    from kp_rl.demo import run_demo

    run_demo(out=Path(args.out), data=Path(args.data), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kp-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

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

    p = sub.add_parser("demo", help="the embedded end-to-end demo on cartpole-swingup")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--data", default="data/demo-cartpole")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"kp-rl: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kp-rl: interrupted; finished work is kept and the command resumes where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
