"""Experiment grids on Ray: every (task, agent, seed) cell of a spec as a Ray task (``kp-rl run SPEC --ray``).

Cells and results are the local runner's (:func:`kp_rl.experiment.run_cell`, :func:`~kp_rl.experiment.summarise`).
Per task, one Ray task collects the data and trains the perception models its cells depend on; each cell asks
for the CPUs / GPUs the spec's ``resources:`` give its agent. A cell whose worker dies is retried up to
``max_retries`` times, resuming from its last checkpoint; cells finished earlier are not submitted.

On a cluster, ``runs``, ``data`` and ``results`` must be on storage every node sees under the same path
(NFS, a shared volume), and kp_rl must be installed on every node. Ray is an optional extra:
``pip install "kp_rl[ray]"``.

Example (a local Ray instance with two CPUs)::

    kp-rl run experiments/structured_vs_unstructured_cpu.yaml --ray --ray-cpus 2
    kp-rl run experiments/structured_vs_unstructured_gpu.yaml --ray ray://head-node:10001
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from kp_rl.agents import get_agent
from kp_rl.experiment import (PREFIXES, ExperimentSpec, cell_result, finished_cells, model_for, perception_models,
                              run_cell, summarise)
from kp_rl.files import write_json


class MissingDependencyError(ImportError):
    """An optional dependency (Ray) is not installed."""


class CellFailedError(RuntimeError):
    """Some cells failed after all retries (the finished ones are kept; re-run to resume)."""


def _train_cell(cell_fn: Callable[..., dict[str, Any]], spec: ExperimentSpec, task: str, agent: str, seed: int,
                models: dict[str, Path], runs_dir: Path, device: str) -> dict[str, Any]:
    return cell_fn(spec, task, agent, seed, model_for(agent, models), runs_dir, progress=False, device=device)


def run_experiment_ray(path: str | Path, address: str | None = None, runs: str | Path = "runs",
                       data: str | Path = "data", results: str | Path = "results", num_cpus: int | None = None,
                       max_retries: int = 2, progress: bool = True,
                       cell_fn: Callable[..., dict[str, Any]] = run_cell) -> dict[str, Any]:
    """Run every cell of a spec as Ray tasks and summarise the results like :func:`~kp_rl.experiment.run_experiment`.

    Args:
        path: the experiment spec (YAML).
        address: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``); None starts a local Ray
            instance (``num_cpus`` caps it) unless this process already joined one.
        runs, data, results: directories (made absolute here: on a cluster, shared storage).
        max_retries: retries of a cell or perception task whose worker process died.
        cell_fn: trains one cell (default :func:`~kp_rl.experiment.run_cell`; same signature).
    Returns:
        The summary written to ``results/<name>/results.json``.
    Raises:
        CellFailedError: cells that still failed after the retries (all others finished and are kept).
    """
    from tqdm.auto import tqdm

    spec = ExperimentSpec.from_yaml(path)
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError('kp-rl run --ray needs Ray: pip install "kp_rl[ray]"') from exc
    runs_dir, data_dir = Path(runs).resolve() / spec.name, Path(data).resolve()
    if not ray.is_initialized():
        env_vars = {"MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
        ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                 runtime_env={"env_vars": env_vars}, log_to_driver=progress)

    def options(need: dict[str, float]) -> dict[str, Any]:
        return {"num_cpus": need.get("cpus", 1), "num_gpus": need.get("gpus", 0), "max_retries": max_retries}

    perceive = ray.remote(perception_models)
    train = ray.remote(_train_cell)
    out = Path(results) / spec.name
    curves: dict[tuple[str, str, int], dict[str, Any]] = {}
    pending: dict[Any, tuple[str, str, int]] = {}
    for task in spec.tasks:
        finished, todo = finished_cells(spec, task, out, runs_dir)
        curves.update(finished)
        if not todo:
            continue
        models: Any = {}
        if any(get_agent(a).needs_model for a, _ in todo):  # pre-trained models, or the online agents' prefixes
            models = perceive.options(**options(spec.resources_for("perception"))).remote(
                spec, task, data_dir, runs_dir, False, prefixes=out.resolve() / PREFIXES)
        for agent, seed in todo:
            need = spec.resources_for(agent)
            device = "cuda" if need.get("gpus", 0) > 0 else "cpu"
            ref = train.options(**options(need)).remote(cell_fn, spec, task, agent, seed, models, runs_dir, device)
            pending[ref] = (task, agent, seed)

    failures: dict[tuple[str, str, int], str] = {}
    bar = tqdm(total=len(spec.cells()), initial=len(curves), desc=f"ray {spec.name}", unit="cell", disable=not progress)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(done[0])
        try:
            curves[cell] = ray.get(done[0])
            write_json(cell_result(out, *cell), curves[cell])
        except Exception as exc:  # noqa: BLE001 - a failed cell must not stop the others
            failures[cell] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        bar.update(1)
    bar.close()
    if failures:
        listed = "; ".join(f"{t}/{a}/seed{s}: {why}" for (t, a, s), why in sorted(failures.items()))
        raise CellFailedError(f"{len(failures)} of {len(spec.cells())} cells failed after {max_retries} retries "
                              f"(finished cells are kept; re-run to resume): {listed}")
    return summarise(spec, curves, out, runs_dir)
