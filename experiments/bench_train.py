"""Training and inference speed of the keypoint model, `cpu` vs `paper` preset, measured in one run.

  * training frames/s: one optimiser step of the autoencoder loss on a batch of windows (the preset's
    batch size x sequence length), frames per second, median of several repeats;
  * VRNN training steps/s (the preset's dynamics batch of N + M steps); on CUDA the step replayed from a CUDA
    graph as training runs it, and eagerly alongside;
  * encoder latency: ``model.encode`` on 1 frame and on a batch of 16 frames (what the RL wrappers call per
    env step / per vector step), milliseconds, median.
The speed-up figures are ratios to the `paper` preset measured alongside. Runs on CUDA when present
(bf16 autocast, as in training), else on the CPU.

    python experiments/bench_train.py [--repeats 5] [--device auto]

Writes results/bench_train/{results.json, bench_train.png}.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

import kp_rl
from kp_rl.bench import machine
from kp_rl.files import save_figure, write_json
from kp_rl.keypoints import count_parameters
from kp_rl.model import PerceptionModel, resolve_device
from kp_rl.train import CudaGraphStep, cpu_has_native_bf16


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_preset(name: str, repeats: int, device: torch.device) -> dict[str, float]:
    config = kp_rl.get_preset(name)
    train, dyn = config.train, config.dynamics
    model = PerceptionModel(config, "keypoints", action_dim=1, with_dynamics=True).to(device)
    size = config.keypoints.image_size
    frames = torch.randint(0, 256, (train.batch_size, train.sequence_length, size, size, 3), dtype=torch.uint8,
                           device=device)
    params = list(model.autoencoder.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    from kp_rl.keypoints import preprocess_frames

    def ae_step() -> None:
        with autocast:
            loss, _ = model.autoencoder.loss(preprocess_frames(frames))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    variants: dict[str, float] = {}
    if device.type == "cpu":  # what kp_rl.train does on the CPU, step by step: channels-last, then bf16 autocast
        variants["fp32"] = timed(ae_step, repeats, device)
        model.autoencoder.to(memory_format=torch.channels_last)
        variants["channels_last"] = timed(ae_step, repeats, device)
        if cpu_has_native_bf16():
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            variants["channels_last_bf16"] = timed(ae_step, repeats, device)
        ae_seconds = variants["channels_last_bf16" if "channels_last_bf16" in variants else "channels_last"]
        autocast = contextlib.nullcontext()
    else:
        ae_seconds = timed(ae_step, repeats, device)

    features = torch.rand(train.dynamics_batch_size, dyn.sequence_length, model.feature_dim, device=device)
    actions = torch.rand(train.dynamics_batch_size, dyn.sequence_length, 1, device=device) * 2 - 1
    rewards = torch.rand(train.dynamics_batch_size, dyn.sequence_length, device=device)
    dyn_batch = {"features": features, "action": actions, "reward": rewards}
    dyn_params = list(model.dynamics.parameters())

    def dyn_step_fn(capturable: bool):  # the training loop's step: loss, backward, clipping, Adam
        dyn_optimizer = torch.optim.Adam(dyn_params, lr=1e-3, capturable=capturable)

        def step(batch: dict[str, torch.Tensor], at: int | torch.Tensor) -> tuple[torch.Tensor]:
            loss, _ = model.dynamics.loss(batch["features"], batch["action"], batch["reward"], at, 1000)
            dyn_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dyn_params, train.clip_grad_norm)
            dyn_optimizer.step()
            return (loss,)

        return step

    eager_step = dyn_step_fn(False)

    def dyn_step() -> None:
        with autocast:
            eager_step(dyn_batch, 100)

    dyn_seconds = timed(dyn_step, repeats, device)  # eager (bf16 autocast on CUDA, as before the graphs)
    graph_seconds = None
    if device.type == "cuda":  # what kp_rl.train now runs there: the step replayed from a CUDA graph (fp32)
        graphed = CudaGraphStep(dyn_step_fn(True), device)
        for _ in range(graphed.warmup + 1):
            graphed(dyn_batch, 100)
        assert graphed.replaying, "the VRNN step could not be captured"
        graph_seconds = timed(lambda: graphed(dyn_batch, 100), repeats * 4, device)
    model.eval()
    latency = {}
    for batch in (1, 16):
        single = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8).numpy()

        def encode() -> None:
            with torch.inference_mode():
                model.encode(single)

        latency[batch] = timed(encode, repeats * 4, device) * 1000
    cnn = PerceptionModel(config, "cnn", action_dim=1, with_dynamics=True)  # the unstructured baseline, same preset
    return {"parameters_autoencoder": count_parameters(model.autoencoder),
            "parameters_vrnn": count_parameters(model.dynamics),
            "parameters_cnn_autoencoder": count_parameters(cnn.autoencoder),
            "parameters_cnn_vrnn": count_parameters(cnn.dynamics),
            "feature_dim": model.feature_dim, "cnn_feature_dim": cnn.feature_dim,
            "train_batch_frames": train.batch_size * train.sequence_length,
            "train_frames_per_s": train.batch_size * train.sequence_length / ae_seconds,
            "train_step_s": ae_seconds,
            # on the CPU the autoencoder step as kp_rl.train runs it (the last variant), and the ones before
            "train_frames_per_s_variants": {k: train.batch_size * train.sequence_length / v for k, v in variants.items()},
            "vrnn_steps_per_s": 1.0 / (graph_seconds or dyn_seconds),
            "vrnn_steps_per_s_eager": 1.0 / dyn_seconds,
            "vrnn_cuda_graph_speedup": dyn_seconds / graph_seconds if graph_seconds else None,
            "encode_1_frame_ms": latency[1], "encode_16_frames_ms": latency[16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="results/bench_train")
    args = parser.parse_args()
    device = resolve_device(args.device)
    rows = {name: bench_preset(name, args.repeats, device) for name in ("cpu", "paper")}
    for key in ("train_frames_per_s", "vrnn_steps_per_s"):
        rows["cpu"][f"{key}_vs_paper"] = rows["cpu"][key] / rows["paper"][key]
    print(f"device: {device} ({machine()['cuda'] or machine()['cpu']})")
    print(f"{'preset':8s} {'AE params':>10s} {'CNN AE':>8s} {'train frames/s':>15s} {'VRNN steps/s':>13s} {'encode 1 (ms)':>14s} "
          f"{'encode 16 (ms)':>15s}")
    for name, r in rows.items():
        print(f"{name:8s} {r['parameters_autoencoder']:10d} {r['parameters_cnn_autoencoder']:8d} {r['train_frames_per_s']:15.1f} {r['vrnn_steps_per_s']:13.1f} "
              f"{r['encode_1_frame_ms']:14.2f} {r['encode_16_frames_ms']:15.2f}")
    print(f"cpu preset trains {rows['cpu']['train_frames_per_s_vs_paper']:.1f}x the paper preset's frames/s")
    for name, r in rows.items():
        if r["train_frames_per_s_variants"]:
            print(f"{name} autoencoder training frames/s, step by step to what kp_rl.train runs: " + ", ".join(
                f"{k} {v:.0f}" for k, v in r["train_frames_per_s_variants"].items()))
    for name, r in rows.items():
        if r["vrnn_cuda_graph_speedup"]:
            print(f"{name} VRNN steps/s: CUDA graph {r['vrnn_steps_per_s']:.1f} vs eager {r['vrnn_steps_per_s_eager']:.1f} "
                  f"({r['vrnn_cuda_graph_speedup']:.1f}x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"results_{device.type}.json", {"device": str(device), "presets": rows,
                                                             "repeats": args.repeats, "machine": machine()})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    names = list(rows)
    axes[0].bar(names, [rows[n]["train_frames_per_s"] for n in names])
    axes[0].set_ylabel(f"training frames/s ({device.type})")
    axes[1].bar([f"{n}\n1 frame" for n in names] + [f"{n}\n16 frames" for n in names],
                [rows[n]["encode_1_frame_ms"] for n in names] + [rows[n]["encode_16_frames_ms"] for n in names])
    axes[1].set_ylabel("encode latency (ms)")
    save_figure(fig, out / f"bench_train_{device.type}.png")
    print(f"wrote {out}/results_{device.type}.json and bench_train_{device.type}.png")


if __name__ == "__main__":
    main()
