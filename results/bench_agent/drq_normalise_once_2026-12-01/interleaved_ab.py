"""Interleaved A/B of the DrQ pixel agent's SAC update, one process, one torch thread: the replay buffer handing
uint8 samples (SB3 normalises them in each of the 5 networks that read them) against float samples normalised
once (RandomShiftReplayBuffer(normalize_images=True), what the catalog's sac-pixels-drq now uses). Same code,
same numbers (tests/test_agents.py checks the updates are bit-identical); prints updates/s per round."""
import dataclasses, json, statistics, sys, time

import torch

from kp_rl.agents import build_agent, get_agent, make_vec_env
from kp_rl.bench import machine
from kp_rl.envs import get_spec

torch.set_num_threads(1)


def make(normalize: bool):
    spec = get_agent("sac-pixels-drq")
    spec = dataclasses.replace(spec, hyperparameters=dict(spec.hyperparameters, buffer_size=2000, learning_starts=600))
    algo = build_agent(spec, make_vec_env(get_spec("cartpole-swingup").env_id, spec, None, seed=0), seed=0)
    algo.replay_buffer.normalize_images = normalize
    algo.learn(600)
    algo.train(gradient_steps=2, batch_size=256)
    return algo


agents = {"uint8 samples": make(False), "normalised once": make(True)}
rates = {name: [] for name in agents}
for _ in range(5):
    for name, algo in agents.items():
        start = time.perf_counter()
        algo.train(gradient_steps=8, batch_size=256)
        rates[name].append(8 / (time.perf_counter() - start))
result = {"machine": machine(), "updates_per_s": rates, "median": {k: statistics.median(v) for k, v in rates.items()}}
json.dump(result, sys.stdout, indent=1)
