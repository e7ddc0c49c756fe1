"""Agent steps/s (env step + one SAC update each) of the catalog's DrQ pixel SAC on cartpole (batch 256), timed after
learning starts: python agent_steps.py [STEPS]; run at two commits back to back to compare."""
import sys, time, torch
import kp_rl.agents
from kp_rl.agents import get_agent, make_vec_env
torch.set_num_threads(2)
spec = get_agent("sac-pixels-drq")
venv = make_vec_env("kp_rl/cartpole-swingup-v0", spec, n_envs=1)
agent = kp_rl.agents.build_agent(spec, venv, seed=0)
agent.learning_starts = 300
agent.learn(320)
t = time.perf_counter(); n = int(sys.argv[1]) if len(sys.argv) > 1 else 150
agent.learn(n, reset_num_timesteps=False)
dt = time.perf_counter() - t
p = agent.policy.state_dict()
print(f"{n / dt:.3f} agent steps/s; checksum {sum(float(v.double().sum()) for v in p.values()):.6f}")
