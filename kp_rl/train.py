"""Training: the frame autoencoder (keypoints or CNN) first, then the VRNN on its frozen features.

Both stages share one loop (:func:`fit`): device ``auto`` (CUDA when present, bf16 autocast there), a tqdm
progress bar, TensorBoard scalars (every loss term separately) and image grids, validation every
``eval_every`` steps, an atomic checkpoint every ``checkpoint_every`` steps and resume from it.
Staged, not joint: the paper's stop-gradient between vision and dynamics optimises the same objectives.

Example (a few steps on a tiny dataset):
    >>> import tempfile, kp_rl
    >>> from kp_rl.data import collect
    >>> root, run = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> _ = collect("cartpole-swingup", root, 3, max_steps=17, progress=False, env_kwargs={"image_size": 32})
    >>> cfg = kp_rl.get_preset("cpu").replace(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4},
    ...     train={"steps": 3, "dynamics_steps": 3, "batch_size": 2, "log_every": 1}, dynamics={"rnn_units": 16})
    >>> path = train_autoencoder(root, run, cfg, progress=False)
    >>> path = train_dynamics(path, root, run + "/dyn", progress=False)
    >>> kp_rl.load(path).has_dynamics
    True
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kp_rl import distributed
from kp_rl.bench import cpu_info
from kp_rl.config import Config, TrainConfig, get_preset
from kp_rl.data import (MANIFEST, DatasetError, EpisodeBlockSampler, FeatureSequences, SequenceDataset,
                        StreamingSequenceDataset, read_manifest, sequence_dataset)
from kp_rl.files import write_json
from kp_rl.keypoints import preprocess_frames
from kp_rl.model import PerceptionModel, checkpoint_file, load, read_checkpoint, resolve_device
from kp_rl.runs import check_output_dir, check_run, checkpoint_hash, start_run

MODEL_FILE = "model.pt"
# torch CPU threads per stage unless the caller says (measured by experiments/bench_threads.py); None: one per core
STAGE_THREADS: dict[str, int | None] = {"autoencoder": None, "dynamics": 1, "agent": 1}


def set_threads(threads: int) -> None:
    """Use ``threads`` torch CPU threads in every stage and everywhere else (what ``kp-rl --threads`` does)."""
    STAGE_THREADS.update(dict.fromkeys(STAGE_THREADS, threads))
    torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's CPU thread count set to ``threads`` (``None``: one per core) for the block, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Trainable(Protocol):
    """What :func:`fit` trains (e.g. :class:`PerceptionModel`): ``save`` writes a checkpoint
    :func:`kp_rl.model.read_checkpoint` reads back, with ``train_state`` under ``"train_state"``."""

    config: Config

    @property
    def device(self) -> torch.device: ...

    def save(self, path: str | Path, train_state: dict[str, Any] | None = None) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...

    def get_submodule(self, target: str) -> torch.nn.Module: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _forever(loader: DataLoader) -> Iterator[Any]:
    for epoch in itertools.count():
        if hasattr(loader.sampler, "set_epoch"):  # distributed / block samplers: a new order each pass
            loader.sampler.set_epoch(epoch)
        yield from loader


def _data_spec(root: Path, dataset: SequenceDataset) -> dict[str, Any]:
    spec: dict[str, Any] = {"path": str(root), "image_shape": list(dataset.image_shape),
                            "action_dim": dataset.action_dim}
    try:
        manifest = read_manifest(root)
        spec.update(env_id=manifest["env_id"], task=manifest["task"], seed=manifest["seed"])
    except DatasetError:
        spec.update(env_id=None)
    return spec


def _validation(data: Path, sequence_length: int,
                streaming: bool | None = False) -> SequenceDataset | StreamingSequenceDataset | None:
    """The held-out episodes, or None when the dataset is too small to hold any out (a warning is logged)."""
    try:
        return sequence_dataset(data, sequence_length, streaming=streaming, split="val",
                                keys=("image", "action", "reward"))
    except DatasetError as exc:
        if distributed.context_from_env().is_main:
            print(f"kp-rl: no validation set ({exc})")
        return None


class _Objective(nn.Module):
    """The training loss as a module, so that DistributedDataParallel all-reduces the trained parameters."""

    def __init__(self, parameters: list[nn.Parameter], loss_fn: Callable, l2_parameters: list[nn.Parameter],
                 weight_decay: float, autocast: Callable[[], contextlib.AbstractContextManager]):
        super().__init__()
        self.trained = nn.ParameterList(parameters)
        self.loss_fn, self.l2_parameters, self.weight_decay, self.autocast = loss_fn, l2_parameters, weight_decay, autocast

    def forward(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        with self.autocast():
            loss, parts = self.loss_fn(batch, step)
        if self.l2_parameters and self.weight_decay > 0:
            loss = loss + self.weight_decay * sum(p.pow(2).sum() for p in self.l2_parameters)
        return loss, parts


class CudaGraphStep:
    """A training step captured once as a CUDA graph and replayed (the VRNN stage on a GPU: launch-bound eagerly).

    ``step_fn(batch, step)`` is the whole step (loss, backward, clipping, update of a ``capturable=True``
    optimiser); ``step`` reaches it as a 0-dim tensor. The first ``warmup`` calls run eagerly on a side stream,
    the next one captures; a batch of another shape runs eagerly, and so does every step after a failed capture
    (with a warning).
    """

    def __init__(self, step_fn: Callable[[dict[str, Tensor], Tensor], tuple[Tensor, ...]], device: torch.device,
                 warmup: int = 3) -> None:
        self.step_fn, self.device, self.warmup = step_fn, device, warmup
        self.step = torch.zeros((), device=device)
        self.calls = 0
        self.failed = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: dict[str, Tensor] = {}
        self.static_out: tuple[Tensor, ...] = ()

    @property
    def replaying(self) -> bool:
        return self.graph is not None

    def __call__(self, batch: dict[str, Tensor], step: int) -> tuple[Tensor, ...]:
        self.step.fill_(step)
        self.calls += 1
        if self.graph is not None and all(self.static_batch[k].shape == v.shape for k, v in batch.items()):
            for key, value in batch.items():
                self.static_batch[key].copy_(value, non_blocking=True)
            self.graph.replay()
            return self.static_out
        if self.failed or self.graph is not None or self.calls <= self.warmup:
            return self._on_side_stream(batch)
        self.static_batch = {k: v.clone() for k, v in batch.items()}
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_out = self.step_fn(self.static_batch, self.step)
        except RuntimeError as error:  # e.g. an op that synchronises with the host
            warnings.warn(f"CUDA graph capture of the training step failed, training eagerly: {error}",
                          RuntimeWarning, stacklevel=2)
            self.failed, self.static_batch, self.static_out = True, {}, ()
            return self._on_side_stream(batch)
        self.graph = graph
        graph.replay()  # capturing ran nothing: this is the step itself
        return self.static_out

    def _on_side_stream(self, batch: dict[str, Tensor]) -> tuple[Tensor, ...]:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.step_fn(batch, self.step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out


def _set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Put a loaded Adam state's step counts on the parameters' device (CUDA graphs) or on the host."""
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(param.device if capturable else "cpu", torch.float32)


def _train_loader(data: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                  context: distributed.DistributedContext) -> DataLoader:
    """Batches of this rank: ``batch_size`` is the per-rank size; the global batch is ``batch_size x world``."""
    drop_last = len(data) >= batch_size * context.world_size
    sampler: Sampler | None = None
    if getattr(data, "streaming", False):  # a StreamingSequenceDataset reading shards on demand
        sampler = EpisodeBlockSampler(data, shuffle=shuffle, seed=seed, num_replicas=context.world_size,
                                      rank=context.rank, drop_last=drop_last and context.enabled)
    elif context.enabled:
        sampler = DistributedSampler(data, context.world_size, context.rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    if sampler is None:  # one process, in memory
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(seed))
    if len(sampler) == 0:
        raise DatasetError(f"{len(data)} training windows cannot be shared among {context.world_size} processes")
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=len(sampler) >= batch_size,
                      num_workers=num_workers)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): only there does bf16 autocast pay."""
    return bool(cpu_info()[1] & {"avx512_bf16", "amx_bf16"})


def _autocast(device: torch.device, cfg: TrainConfig, graphed: bool, stage: str) -> contextlib.AbstractContextManager:
    """bf16 autocast: on CUDA with ``train.amp`` (not inside a CUDA graph); on the CPU with ``train.cpu_amp``,
    whose default (None) is the autoencoder stage on a CPU with native bf16."""
    if device.type == "cuda" and cfg.amp and not graphed:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and (cfg.cpu_amp if cfg.cpu_amp is not None
                                 else stage == "autoencoder" and cpu_has_native_bf16()):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(
    model: Trainable,
    parameters: list[torch.nn.Parameter],
    loss_fn: Callable[[dict[str, Tensor], int], tuple[Tensor, dict[str, Tensor]]],
    train_data: Dataset,
    val_data: Dataset | None,
    out: Path,
    *,
    steps: int,
    batch_size: int,
    stage: str,
    l2_parameters: list[torch.nn.Parameter] = (),
    images_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
    progress: bool = True,
    shuffle: bool = True,
    cuda_graph: bool = False,
    threads: int | None = None,
) -> Path:
    """The shared training loop. Resumes from ``out/model.pt`` when it holds an unfinished run of ``stage``.

    Launched by ``torchrun`` (``WORLD_SIZE > 1``), every rank runs this loop on its share of the data under
    DistributedDataParallel: ``batch_size`` stays the global batch (each rank takes ``batch_size / world``),
    logged losses are averaged over the ranks, and rank 0 alone validates, logs and writes checkpoints (the
    others wait for it). A checkpoint holds no per-rank state, so a run resumes under any number of processes.

    Args:
        model: the bundle to train (saved whole at every checkpoint).
        parameters: the parameters the optimiser updates (the rest stay frozen).
        loss_fn: ``(batch on device, step) -> (loss, {name: scalar})``; every name is logged.
        train_data, val_data: datasets of dict items; validation runs every ``eval_every`` steps.
        out: run directory (``model.pt``, ``history.json``, ``tb/`` TensorBoard logs).
        steps, batch_size: budget.
        stage: name stored in the checkpoint's train state (``autoencoder`` or ``dynamics``).
        l2_parameters: tensors that get ``weight_decay * sum(w**2)`` added to the loss.
        images_fn: batch -> uint8 image grid (3, H, W) for TensorBoard, every ``image_every`` steps.
        shuffle: random window order (False: dataset order, e.g. to compare runs step by step).
        cuda_graph: on one CUDA device, replay each step from a CUDA graph in fp32 (:class:`CudaGraphStep`): for
            losses with no host copies or data-dependent branches that take their step as a tensor.
        threads: torch CPU threads while training (default: :data:`STAGE_THREADS` of ``stage``).

    With early stopping (``train.patience > 0``) each plateau of the validation loss lowers the learning rate
    (``train.lr_reductions`` times, ``history["lr_reductions"]``) and the next one ends training; a finished run's
    ``model.pt`` holds the weights of its lowest validation loss (``history["restored_best"]``). A run stopped under
    another rule (``history["stopped"]["rule"]``) goes on when resumed if this rule would not have stopped it.
    Returns:
        Path of the final checkpoint.
    """
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    path = out / MODEL_FILE
    world = distributed.context_from_env().world_size
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} does not divide among {world} processes; "
                         f"choose a multiple of {world}")
    device = distributed.local_device(model.device)  # cuda:LOCAL_RANK under torchrun
    with torch_threads(threads or STAGE_THREADS.get(stage)), distributed.process_group(device) as context:
        if context.enabled:
            model.to(device)
        cfg = model.config.train
        main = context.is_main
        out.mkdir(parents=True, exist_ok=True)
        graphed = cuda_graph and device.type == "cuda" and not context.enabled
        optimizer = torch.optim.Adam(parameters, lr=cfg.lr, capturable=graphed)
        start_step, history = 0, {"train": [], "val": []}
        best_weights: dict[str, Tensor] | None = None  # with early stopping: the weights of the best validation
        if path.exists():
            checkpoint = read_checkpoint(path)
            state = checkpoint["train_state"] or {}
            if state.get("stage") == stage:
                _restore_trained(model, parameters, checkpoint["state_dict"])
                optimizer.load_state_dict(state["optimizer"])
                _set_capturable(optimizer, graphed)  # the checkpoint may come from the other kind of run
                start_step, history = state["step"], state["history"]
                torch.set_rng_state(state["torch_rng"])
                best_weights = state.get("best_weights")
        rule = _stopping_rule(cfg)
        if history.get("stopped") and history["stopped"].get("rule", {**rule, "lr_reductions": 0}) != rule:
            decision = _plateau_decision(history, cfg)  # stopped under another rule: does this one stop it too?
            if decision != STOP:
                del history["stopped"]
            if decision == REDUCE_LR:
                _reduce_lr(optimizer, history, cfg.lr_factor, start_step)
        if history.get("stopped") or start_step == steps:  # stopped: the run has converged, whatever the budget
            return path
        if start_step > steps:
            raise ValueError(f"{out} has trained {start_step} {stage} steps, more than the {steps} asked for; "
                             f"ask for {start_step} or more to extend it")
        if context.rank > 0:  # own noise stream per rank (VRNN samples); rank 0 keeps the one it saves
            torch.manual_seed(int(torch.randint(2**62, ())) + context.rank)

        batches = _forever(_train_loader(train_data, batch_size // context.world_size, shuffle, cfg.seed + start_step,
                                         cfg.num_workers, context))
        writer = SummaryWriter(str(out / "tb"), purge_step=start_step) if main else None
        objective: nn.Module = _Objective(list(parameters), loss_fn, list(l2_parameters), cfg.weight_decay,
                                          lambda: _autocast(device, cfg, graphed, stage))
        if context.enabled:
            objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                                find_unused_parameters=False)

        def to_device(batch: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

        def log_scalars(prefix: str, row: dict[str, float]) -> None:
            for name, value in row.items():
                if name != "step":
                    writer.add_scalar(f"{prefix}/{name}", value, row["step"])

        def save(step: int) -> None:
            if main:
                model.save(path, train_state={"stage": stage, "step": step, "optimizer": optimizer.state_dict(),
                                              "history": history, "torch_rng": torch.get_rng_state(),
                                              "best_weights": best_weights})
                write_json(out / "history.json", history)
            distributed.barrier()  # the other ranks go on once the checkpoint is complete

        def validate(step: int) -> int:
            """Validation loss at the end-of-training schedules, with fixed noise (comparable across evaluations);
            returns what the stopping rule (``train.patience``) decides: ``GO_ON``, ``REDUCE_LR`` or ``STOP``."""
            if not main or val_data is None or len(val_data) == 0:
                return GO_ON
            model.eval()
            sums: Counter[str] = Counter()
            count = 0
            val_loader = DataLoader(val_data, batch_size=batch_size, shuffle=False)
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(cfg.seed)
                for batch in itertools.islice(val_loader, cfg.eval_batches):
                    with _autocast(device, cfg, graphed, stage):
                        _, parts = loss_fn(to_device(batch), steps)
                    sums.update({name: float(value) for name, value in parts.items()})
                    count += 1
            model.train()
            row = {"step": step, **{k: v / count for k, v in sums.items()}}
            history["val"].append(row)
            log_scalars("val", row)
            nonlocal best_weights
            best = history.get("best")
            if best is None or row["loss"] < best["loss"] - cfg.min_improvement * abs(best["loss"]):
                history["best"], history["stale"] = {"step": step, "loss": row["loss"]}, 0
            else:
                history["stale"] = history.get("stale", 0) + 1
            if cfg.patience > 0 and (best is None or row["loss"] < best["loss"]):  # any new low, not only 1% ones
                best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                history["best_weights_step"] = step
            return _plateau_decision(history, cfg)

        def train_step(batch: dict[str, Tensor], step: int | Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
            loss, parts = objective(batch, step)
            if not graphed and not torch.isfinite(loss):  # (a graph's loss is checked after its replay)
                raise FloatingPointError(f"{stage} loss is {float(loss)} at step {step}; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, cfg.clip_grad_norm)
            optimizer.step()
            return loss.detach(), parts, grad_norm  # (a kept autograd graph would pin the parameters' grad nodes)

        graph_step = CudaGraphStep(train_step, device) if graphed else None

        model.train()
        bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc=f"train {stage}",
                   disable=not (progress and main), unit="step")
        tick, logged = time.perf_counter(), start_step
        try:
            for step in bar:
                batch = to_device(next(batches))
                loss, parts, grad_norm = (graph_step or train_step)(batch, step)
                if graph_step is not None and not torch.isfinite(loss):  # updated already: stop before saving
                    raise FloatingPointError(f"{stage} loss is {float(loss)} at step {step}; lower train.lr")
                done = step + 1
                log = done % cfg.log_every == 0 or done == steps
                if log:
                    parts = distributed.mean_across_ranks(parts)
                if main and log:
                    elapsed = time.perf_counter() - tick
                    row = {"step": done, **{k: float(v) for k, v in parts.items()}, "grad_norm": float(grad_norm),
                           "steps_per_s": (done - logged) / max(elapsed, 1e-9)}
                    if graph_step is not None:
                        row["cuda_graph"] = float(graph_step.replaying)
                    history["train"].append(row)
                    log_scalars("train", row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}")
                    tick, logged = time.perf_counter(), done
                if main and images_fn is not None and (done % cfg.image_every == 0 or done == steps):
                    model.eval()
                    with torch.no_grad():
                        writer.add_image(f"{stage}/frames_reconstructions_keypoints", images_fn(batch), done)
                    model.train()
                # rank 0 validates and decides
                decision = distributed.broadcast_int(validate(done)) if done % cfg.eval_every == 0 or done == steps \
                    else GO_ON
                if decision == REDUCE_LR:
                    lr = _reduce_lr(optimizer, history, cfg.lr_factor, done)
                    if progress and main:
                        bar.write(f"{stage}: validation loss on a plateau at step {done}: learning rate now {lr:.3g}")
                    if graph_step is not None:  # the captured update holds the old rate: capture again
                        graph_step = CudaGraphStep(train_step, device)
                stop = decision == STOP
                if stop:
                    history["stopped"] = {"step": done, "best_step": history["best"]["step"],
                                          "best_loss": history["best"]["loss"], "rule": rule,
                                          "reason": f"no {cfg.min_improvement:.0%} improvement of the validation "
                                                    f"loss in {cfg.patience} evaluations after "
                                                    f"{cfg.lr_reductions} learning-rate reductions"}
                if (stop or done == steps) and best_weights is not None:  # a finished run keeps its best validation
                    model.load_state_dict(best_weights)
                    history["restored_best"] = history["best_weights_step"]
                if stop or done % cfg.checkpoint_every == 0 or done == steps:
                    save(done)
                if stop:
                    break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return path


GO_ON, REDUCE_LR, STOP = 0, 1, 2  # the stopping rule's decisions after a validation


def _stopping_rule(cfg: TrainConfig) -> dict[str, float]:
    """The settings that decide convergence, stored with a stopped run (a run stopped under another rule reopens)."""
    return {"patience": cfg.patience, "min_improvement": cfg.min_improvement, "lr_reductions": cfg.lr_reductions,
            "lr_factor": cfg.lr_factor}


def _plateau_decision(history: dict[str, Any], cfg: TrainConfig) -> int:
    """After a validation: on a plateau (``patience`` evaluations without a ``min_improvement`` new best) reduce the
    learning rate while ``lr_reductions`` allow, else stop; otherwise go on."""
    if cfg.patience <= 0 or history.get("stale", 0) < cfg.patience:
        return GO_ON
    return REDUCE_LR if len(history.get("lr_reductions", [])) < cfg.lr_reductions else STOP


def _reduce_lr(optimizer: torch.optim.Optimizer, history: dict[str, Any], factor: float, step: int) -> float:
    """Multiply every group's learning rate by ``factor`` (kept in the optimiser's checkpointed state) and begin a
    new plateau count; the reduction is recorded in ``history["lr_reductions"]``."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
    lr = optimizer.param_groups[0]["lr"]
    history.setdefault("lr_reductions", []).append({"step": step, "lr": lr})
    history["stale"] = 0
    return lr


def _restore_trained(model: Trainable, parameters: list[torch.nn.Parameter], stored: dict[str, Tensor]) -> None:
    """Load the checkpointed state of the submodules a resumed run trains (``autoencoder.*`` or ``dynamics.*``):
    the stored optimiser state only fits the weights it was saved with. The rest stays as the caller set it."""
    trained = {id(p) for p in parameters}
    for owner in {name.split(".")[0] for name, p in model.named_parameters() if id(p) in trained}:
        model.get_submodule(owner).load_state_dict(
            {k[len(owner) + 1:]: v for k, v in stored.items() if k.startswith(f"{owner}.")})  # strict: all of it


# -- stage 1: autoencoder ----------------------------------------------------------------------------------
def _autoencoder_images(model: PerceptionModel, batch: dict[str, Tensor], rows: int = 4) -> Tensor:
    """Grid: per example one row of [frame | reconstruction | keypoints on frame] for the first 4 steps."""
    from kp_rl.report import draw_keypoints

    frames = preprocess_frames(batch["image"][:rows])
    reconstruction, out = model.autoencoder(frames)
    to_uint8 = lambda x: ((x.float().clamp(-0.5, 0.5) + 0.5) * 255).round().byte().movedim(-3, -1).cpu().numpy()
    truth, recon = to_uint8(frames), to_uint8(reconstruction)
    keypoints = out.keypoints.float().cpu().numpy() if model.representation == "keypoints" else None

    def tile(b: int, t: int) -> np.ndarray:
        overlay = truth[b, t] if keypoints is None else draw_keypoints(truth[b, t], keypoints[b, t])
        return np.concatenate([truth[b, t], recon[b, t], overlay], axis=1)

    lines = [np.concatenate([tile(b, t) for t in range(min(4, truth.shape[1]))], axis=1) for b in range(len(truth))]
    return torch.from_numpy(np.concatenate(lines, axis=0)).permute(2, 0, 1)


def train_autoencoder(
    data: str | Path,
    out: str | Path,
    config: Config | None = None,
    representation: str = "keypoints",
    device: str = "auto",
    progress: bool = True,
    *,
    streaming: bool | None = None,
    shuffle: bool = True,
    threads: int | None = None,
) -> Path:
    """Train the keypoint autoencoder (or the CNN baseline's) on a dataset; returns ``out/model.pt``.

    Resumes the run in ``out``, extending it when ``config`` asks for more steps; otherwise ``config`` must agree
    with the stored one (:func:`resumed_config`). A folder holding another run (:mod:`kp_rl.runs`) is refused
    before anything is written. Under ``torchrun`` it trains data-parallel (see :func:`fit`).

    Args:
        streaming: read episodes on demand (:class:`~kp_rl.data.StreamingSequenceDataset`) instead of holding
            them in memory; None: stream above :data:`~kp_rl.data.STREAMING_MIN_FRAMES` frames.
        shuffle: random window order (False: dataset order).
        threads: torch CPU threads (default: one per core; see :data:`STAGE_THREADS`).
    """
    out, data, device = Path(out), Path(data), distributed.local_device(resolve_device(device))
    path = out / MODEL_FILE
    stored = read_checkpoint(path) if check_output_dir(out).joinpath(MODEL_FILE).exists() else None
    preset = config.preset if config is not None else stored["config"]["preset"] if stored is not None else "cpu"
    identity = {"command": "train", "stage": "autoencoder", "representation": representation,
                "env_id": _dataset_env(data), "preset": preset}
    found = _found_identity(stored)
    check_run(out, identity, found)
    if stored is not None:
        config = resumed_config(path, Config.from_dict(stored["config"]), config, "steps")
    config = (config or get_preset("cpu")).validate()
    seed_everything(config.train.seed)
    train_set = sequence_dataset(data, config.train.sequence_length, streaming=streaming, split="train")
    val_set = _validation(data, config.train.sequence_length, streaming=streaming)
    height, width, _ = train_set.image_shape
    if (height, width) != (config.keypoints.image_size,) * 2:
        raise ValueError(f"dataset {data} has {height}x{width} frames but keypoints.image_size is "
                         f"{config.keypoints.image_size}; set it to match (or collect with --image-size)")
    if stored is not None:
        model = load(path, device=device)
        model.config = config  # the stored run, with this call's step budget
    else:
        model = PerceptionModel(config, representation, action_dim=train_set.action_dim,
                                data_spec=_data_spec(data, train_set)).to(device)
    _start_run(out, identity, found)
    model.train()
    autoencoder = model.autoencoder
    if next(autoencoder.parameters()).device.type == "cpu":
        # same numbers, about 2x faster training steps on the CPU (oneDNN convolutions)
        autoencoder.to(memory_format=torch.channels_last)

    def loss_fn(batch: dict[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor]]:
        return autoencoder.loss(preprocess_frames(batch["image"]))

    return fit(model, list(autoencoder.parameters()), loss_fn, train_set, val_set, out,
               steps=config.train.steps, batch_size=config.train.batch_size, stage="autoencoder",
               l2_parameters=list(autoencoder.l2_parameters()),
               images_fn=lambda batch: _autoencoder_images(model, batch), progress=progress, shuffle=shuffle,
               threads=threads)


# -- stage 2: dynamics on frozen features --------------------------------------------------------------------
def train_dynamics(
    autoencoder_run: str | Path | None,
    data: str | Path,
    out: str | Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    device: str = "auto",
    progress: bool = True,
    datasets: tuple[Dataset, Dataset | None] | None = None,
    *,
    streaming: bool | None = None,
    threads: int | None = None,
    preset: str | None = None,
) -> Path:
    """Train the VRNN (+ reward head) on the frozen features of a trained autoencoder; returns ``out/model.pt``.

    Resumes the run in ``out`` (extending it when ``overrides`` raise ``train.dynamics_steps``); ``out/run.json``
    records the autoencoder it was built on (path and checkpoint hash), which a resume that names one checks.

    Args:
        autoencoder_run: checkpoint (or run directory) of :func:`train_autoencoder`; None resumes ``out`` alone.
        data: dataset directory (with actions and rewards).
        out: run directory of the dynamics model; the saved bundle holds autoencoder + VRNN.
        overrides: config changes for this stage, e.g. ``{"dynamics": {"best_of_many": False}}``; on a resume
            they must agree with the run's config but for ``train.dynamics_steps`` and the stopping rule
            (see :func:`resumed_config`).
        preset: when given, the preset the autoencoder must have been trained with (else a ValueError).
        datasets: pre-computed ``(train, val)`` :class:`FeatureSequences` of this autoencoder's features
            (saves re-encoding the data when several dynamics models share one autoencoder).
        streaming: encode the frames episode by episode from disk (None: above
            :data:`~kp_rl.data.STREAMING_MIN_FRAMES` frames); the VRNN's features are small and held in memory.
        threads: torch CPU threads (default: 1; see :data:`STAGE_THREADS`).

    Under ``torchrun`` it trains data-parallel (see :func:`fit`); every rank encodes the data itself.
    """
    out, data, device = Path(out), Path(data), distributed.local_device(resolve_device(device))
    resume = check_output_dir(out).joinpath(MODEL_FILE).exists()
    if autoencoder_run is None and not resume:
        raise ValueError("dynamics training needs the trained autoencoder run to build on (--keypoints RUN)")
    # the autoencoder is read whenever it is named: on a resume it must be the one the run was built on
    source = read_checkpoint(autoencoder_run) if autoencoder_run is not None else None
    stored = read_checkpoint(out / MODEL_FILE) if resume else None
    base = stored if stored is not None else source
    if preset is not None and base["config"]["preset"] != preset:
        raise ValueError(f"{out if stored is not None else autoencoder_run} was trained with preset "
                         f"{base['config']['preset']!r}, not {preset!r}; dynamics keep their autoencoder's preset")
    identity = {"command": "train", "stage": "dynamics", "representation": base["representation"],
                "env_id": _dataset_env(data), "preset": base["config"]["preset"],
                "model": str(checkpoint_file(autoencoder_run).resolve()) if source is not None else None,
                "model_sha256": checkpoint_hash(autoencoder_run) if source is not None else None}
    found = _found_identity(stored)
    check_run(out, identity, found)
    if stored is not None:
        if not stored["has_dynamics"]:
            raise ValueError(f"{out / MODEL_FILE} is not a dynamics run; choose another output folder")
        requested = Config.from_dict(stored["config"]).replace(**overrides) if overrides else None
        model = load(out / MODEL_FILE, device=device)
        model.config = resumed_config(out / MODEL_FILE, model.config, requested, "dynamics_steps")
    else:
        model = load(autoencoder_run, device=device)
        config = model.config.replace(**(overrides or {}))
        if config.keypoints != model.config.keypoints or config.cnn != model.config.cnn:
            raise ValueError("overrides may change the dynamics and train sections only: the autoencoder is trained")
        model.config = config
        seed_everything(model.config.train.seed)  # the VRNN's initial weights follow the run's seed
        model.add_dynamics()
        model.to(device)
    trained_on = model.data_spec.get("env_id")
    if identity["env_id"] and trained_on and identity["env_id"] != trained_on:
        raise ValueError(f"dataset {data} is of {identity['env_id']}, the autoencoder was trained on {trained_on}")
    config = model.config
    seed_everything(config.train.seed)
    length = config.dynamics.sequence_length
    if datasets is None:
        frames_train = sequence_dataset(data, 1, streaming=streaming, split="train",
                                        keys=("image", "action", "reward"))
        frames_val = _validation(data, 1, streaming=streaming)
        if frames_train.action_dim != model.action_dim:
            raise ValueError(f"dataset {data} has action_dim {frames_train.action_dim}, the model was built for "
                             f"{model.action_dim}")
        model.eval()
        train_set = FeatureSequences.from_frames(model, frames_train, length)
        val_set = FeatureSequences.from_frames(model, frames_val, length) if frames_val is not None else None
    else:
        train_set, val_set = datasets
    dynamics = model.dynamics
    if stored is None:  # a fresh VRNN: its reward head learns rewards normalised by the training split
        dynamics.set_reward_normalisation(*train_set.reward_statistics())
    model.train()
    model.autoencoder.eval()
    steps = config.train.dynamics_steps

    def loss_fn(batch: dict[str, Tensor], step: int | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return dynamics.loss(batch["features"], batch["action"], batch["reward"], step, steps)

    _start_run(out, identity, found)
    return fit(model, list(dynamics.parameters()), loss_fn, train_set, val_set, out, steps=steps,
               batch_size=config.train.dynamics_batch_size, stage="dynamics", progress=progress,
               cuda_graph=config.train.cuda_graphs, threads=threads)


def resumed_config(path: Path, stored: Config, requested: Config | None, budget: str) -> Config:
    """The config a resumed run trains under: ``stored`` with ``requested``'s ``train.<budget>`` and stopping rule
    (a finished run extends to a bigger budget or a stricter rule). Any other difference would be silently ignored,
    so it is refused instead."""
    if requested is None:
        return stored
    old, new = _flat_config(stored), _flat_config(requested)
    free = [budget, *_stopping_rule(requested.train)]
    differ = [k for k in old if k not in {f"train.{name}" for name in free} and old[k] != new.get(k)]
    if differ:
        more = ", ..." if len(differ) > 3 else ""
        ours = ", ".join(f"{k}={old[k]!r}" for k in differ[:3]) + more
        theirs = ", ".join(f"{k}={new.get(k)!r}" for k in differ[:3]) + more
        raise ValueError(f"{path} was trained with {ours}, not {theirs}; a resumed run keeps its settings "
                         f"(only its step budget and stopping rule may change): choose another output folder")
    return stored.replace(train={name: getattr(requested.train, name) for name in free})


def _flat_config(config: Config) -> dict[str, Any]:
    """``{"preset": ..., "train.steps": ..., ...}``."""
    sections = {name: values for name, values in config.to_dict().items() if isinstance(values, dict)}
    return {"preset": config.preset, **{f"{s}.{k}": v for s, values in sections.items() for k, v in values.items()}}


def _dataset_env(data: Path) -> str | None:
    """The env id a dataset's manifest names (None for a reference-format folder); a missing folder is an error."""
    if data.is_dir() and not (data / MANIFEST).exists():
        return None
    return read_manifest(data)["env_id"]


def _found_identity(checkpoint: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a run folder made before ``run.json`` existed holds, from its checkpoint."""
    if checkpoint is None:
        return None
    state = checkpoint.get("train_state") or {}
    return {"command": "train", "stage": state.get("stage", "dynamics" if checkpoint["has_dynamics"] else "autoencoder"),
            "representation": checkpoint["representation"], "env_id": checkpoint["data_spec"].get("env_id"),
            "preset": checkpoint["config"]["preset"]}


def _start_run(out: Path, identity: dict[str, Any], found: dict[str, Any] | None) -> None:
    if distributed.context_from_env().is_main:  # one writer under torchrun
        start_run(out, identity, found)


def training_seconds(history: dict[str, list[dict[str, float]]]) -> float:
    """Wall-clock seconds of a run's training loop from its logged rates, summed over resumed sessions.

    Validation, images and checkpoints between two log rows count; the work after the last row does not.
    """
    seconds, previous = 0.0, 0
    for row in history.get("train", []):
        if math.isfinite(row["steps_per_s"]) and row["steps_per_s"] > 0:
            seconds += (row["step"] - previous) / row["steps_per_s"]
        previous = row["step"]
    return seconds
