"""Parameters after 5 SAC updates of the DrQ pixel agent from the same start and seeds: python same_updates.py OUT.pt
at two commits, then compare the saved state dicts (max abs difference)."""
import sys, torch
import kp_rl.agents
from kp_rl.agents import get_agent, make_vec_env
from stable_baselines3.common.utils import set_random_seed
torch.set_num_threads(2)
spec = get_agent("sac-pixels-drq")
venv = make_vec_env("kp_rl/cartpole-swingup-v0", spec, n_envs=1)
agent = kp_rl.agents.build_agent(spec, venv, seed=0)
agent.learning_starts, agent.batch_size = 64, 64
agent.learn(64)
set_random_seed(0)
agent.train(gradient_steps=5, batch_size=64)
torch.save({k: v.contiguous() for k, v in agent.policy.state_dict().items()}, sys.argv[1])
