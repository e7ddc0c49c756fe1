"""Held-out open-loop reward R² (prior mean, 8 steps after 8 observed; non-overlapping windows of all 20 episodes of
data/cartpole-swingup-test) of the models given as name=checkpoint: python reward_r2.py pretrained=pretrained:cartpole-swingup ..."""
import sys, numpy as np, torch, kp_rl
from kp_rl.data import SequenceDataset, FeatureSequences
from kp_rl.evaluate import evaluate_reward_prediction
torch.set_num_threads(1)
frames = SequenceDataset("data/cartpole-swingup-test", 1, split="all", keys=("image", "action", "reward"))
for spec in sys.argv[1:]:
    name, path = spec.split("=")
    m = kp_rl.load(path); dyn = m.config.dynamics
    w = FeatureSequences.from_frames(m, frames, dyn.sequence_length, stride=dyn.sequence_length).stacked(2000)
    s = evaluate_reward_prediction(m.dynamics, w, dyn.observed_steps, 1)
    print(name, "windows", len(w["reward"]), "R2 prior mean %.3f" % s["prior_mean"]["r2_mean"], flush=True)
