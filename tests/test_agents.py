import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kp_rl
from kp_rl.agents import OBSERVATION_KINDS, UnknownAgentError, get_agent, load_agent_catalog, make_vec_env, train_agent
from kp_rl.experiment import ExperimentSpec, iqm_with_ci, probability_of_improvement, summarise


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    cfg = kp_rl.get_preset("cpu").replace(
        keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4, "layers_per_scale": 0},
        dynamics={"rnn_units": 16, "latent_dim": 4})
    path = tmp_path_factory.mktemp("model") / "model.pt"
    kp_rl.PerceptionModel(cfg, action_dim=1, with_dynamics=True).save(path)
    return path


def test_catalog_covers_every_observation_kind_for_sac_and_ppo():
    catalog = load_agent_catalog()
    for algo in ("SAC", "PPO"):
        assert {s.observation for s in catalog.values() if s.algo == algo} == set(OBSERVATION_KINDS)
    assert catalog["sac-pixels"].policy == "CnnPolicy" and catalog["sac-pixels"].frame_stack == 3
    with pytest.raises(UnknownAgentError, match="unknown agent 'sac-magic'"):
        get_agent("sac-magic")


@pytest.mark.parametrize("name,dim", [("sac-state", 5), ("sac-keypoints", 2 * 12), ("sac-keypoints-belief", None),
                                      ("sac-pixels", None)])
def test_vec_env_observations_per_kind(name, dim, model_path):
    venv = make_vec_env("kp_rl/cartpole-swingup-v0", get_agent(name), model_path, n_envs=2,
                        env_kwargs={"image_size": 32})
    obs = venv.reset()
    if name == "sac-pixels":
        assert obs.shape == (2, 32, 32, 9) and obs.dtype == np.uint8
    elif name == "sac-keypoints-belief":
        assert obs.shape[0] == 2 and obs.shape[1] > 12 and obs.dtype == np.float32
    else:
        assert obs.shape == (2, dim)
    venv.close()
    if get_agent(name).needs_model:
        with pytest.raises(ValueError, match="needs --model"):
            make_vec_env("kp_rl/cartpole-swingup-v0", get_agent(name))


def test_train_agent_writes_curve_and_resumes(model_path, tmp_path):
    spec = get_agent("sac-keypoints-belief")
    spec = dataclasses.replace(spec, hyperparameters={**spec.hyperparameters, "learning_starts": 20, "batch_size": 16})
    kwargs = dict(model=model_path, eval_every=30, eval_episodes=1, env_kwargs={"image_size": 32}, progress=False)
    curve = train_agent("kp_rl/cartpole-swingup-v0", spec, 60, tmp_path, **kwargs)
    assert curve["steps"] == [30, 60] and len(curve["returns"]) == 2 and curve["done"]
    assert (tmp_path / "agent.zip").exists() and (tmp_path / "replay_buffer.pkl").exists()
    assert json.loads((tmp_path / "curve.json").read_text())["steps"] == [30, 60]
    again = train_agent("kp_rl/cartpole-swingup-v0", spec, 90, tmp_path, **kwargs)  # a bigger budget continues
    assert again["steps"] == [30, 60, 90] and again["seconds"][-1] >= curve["seconds"][-1]
    # SB3's EvalCallback record, continued across the resume, agrees with the curve
    with np.load(tmp_path / "evaluations.npz") as record:
        assert record["timesteps"].tolist() == [30, 60, 90] and record["results"].shape == (3, 1)
        np.testing.assert_allclose(record["results"].mean(axis=1), again["returns"], rtol=1e-6)
    assert (tmp_path / "best_model.zip").exists()


def test_iqm_confidence_interval_brackets_the_point_estimate():
    iqm, low, high = iqm_with_ci(np.array([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert low <= iqm <= high and iqm < 10  # robust to the outlier


def test_bootstrap_cis_do_not_depend_on_what_ran_before():
    """A grid's report computes many CIs in one process: each must be the one a fresh process computes."""
    scores = np.array([323.2, 357.4, 366.2, 378.9, 291.8])
    first = iqm_with_ci(scores)
    np.random.seed(123)
    np.random.rand(7)
    assert iqm_with_ci(scores) == first == iqm_with_ci(scores)
    x, y = np.array([[3.0], [4.0], [5.0]]), np.array([[1.0], [4.5], [2.0]])
    assert probability_of_improvement(x, y) == probability_of_improvement(x, y)
    state = np.random.get_state()
    iqm_with_ci(scores)
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's global stream is left as it was


def test_experiment_spec_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [cartpole-flip]\nagents: [sac-state]\nseeds: [0]\nsteps: 10\n")
    with pytest.raises(ValueError, match="unknown task"):
        ExperimentSpec.from_yaml(bad)
    bad.write_text("tasks: [cartpole-swingup]\nagents: [sac-state]\nseeds: [0]\n")
    with pytest.raises(ValueError, match="one of steps / env_steps"):
        ExperimentSpec.from_yaml(bad)
    with pytest.raises(FileNotFoundError, match="experiment spec not found"):
        ExperimentSpec.from_yaml(tmp_path / "missing.yaml")
    spec = ExperimentSpec.from_yaml("experiments/structured_vs_unstructured_gpu.yaml")
    assert spec.agent_steps("cartpole-swingup") == 12_500 and spec.agent_steps("walker-walk") == 50_000
    cpu = ExperimentSpec.from_yaml("experiments/structured_vs_unstructured_cpu.yaml")
    assert len(cpu.cells()) == 35 and "sac-pixels-drq" not in cpu.agents_for("reacher-easy")  # 2 x 3 x 5 + 5
    good = "tasks: [cartpole-swingup]\nagents: [sac-state]\nseeds: [0]\nsteps: 10\n"
    bad.write_text(good + "exclude: [reacher-easy/sac-state]\n")
    with pytest.raises(ValueError, match="not task/agent pairs"):
        ExperimentSpec.from_yaml(bad)
    bad.write_text(good + "compare: sac-pixels\n")
    with pytest.raises(ValueError, match="compare: 'sac-pixels' is not one of the agents"):
        ExperimentSpec.from_yaml(bad)


def test_summary_gives_each_tasks_probability_of_improvement_beside_the_average(tmp_path):
    spec_path = tmp_path / "two.yaml"
    spec_path.write_text("name: two\ntasks: [cartpole-swingup, reacher-easy]\nagents: [sac-state, ppo-state]\n"
                         "seeds: [0, 1, 2]\nsteps: 10\nrandom_episodes: 0\ncompare: sac-state\n")
    spec = ExperimentSpec.from_yaml(spec_path)
    wins = {"cartpole-swingup": 100.0, "reacher-easy": -100.0}  # sac-state beats ppo-state on one task, loses on the other
    curves = {(t, a, s): {"returns": [0.0, s + (wins[t] if a == "sac-state" else 0.0)], "steps": [0, 10],
                          "seconds": [0.0, 1.0]}
              for t in spec.tasks for a in spec.agents for s in spec.seeds}
    curves["cartpole-swingup", "sac-state", 0]["machine"] = {"cpu": "AMD EPYC", "cpu_simd": ["avx2", "avx512f"],
                                                            "torch_threads": 2, "cuda": None}
    summary = summarise(spec, curves, tmp_path)["summary"]
    assert summary["cartpole-swingup"]["sac-state"]["machines"] == {"AMD EPYC AVX-512, 2 torch thread(s)": 1,
                                                                    "machine not recorded": 2}
    pair = summary["probability_of_improvement"]["sac-state > ppo-state"]
    assert pair["point"] == 0.5 and pair["tasks"] == spec.tasks
    assert pair["per_task"]["cartpole-swingup"]["point"] == 1.0 and pair["per_task"]["reacher-easy"]["point"] == 0.0


def test_kp_rl_run_state_grid_end_to_end(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\ntasks: [cartpole-swingup]\nagents: [ppo-state, sac-state]\nseeds: [0, 1]\nsteps: 64\n"
                    "eval_every: 32\neval_episodes: 1\nfinal_evaluations: 2\nrandom_episodes: 2\ncompare: ppo-state\n")
    cmd = [sys.executable, "-m", "kp_rl.cli", "run", str(spec), "--runs", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results"), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "results" / "tiny" / "results.json").read_text())
    row = summary["summary"]["cartpole-swingup"]["ppo-state"]
    assert len(row["final_returns"]) == 2 and row["ci"][0] <= row["iqm"] <= row["ci"][1]
    assert row["final_returns"][0] == np.mean(summary["curves"]["cartpole-swingup/ppo-state/seed0"]["returns"][-2:])
    assert summary["summary"]["cartpole-swingup"]["random"]["episodes"] == 2
    pair = summary["summary"]["probability_of_improvement"]["ppo-state > sac-state"]
    assert pair["ci"][0] <= pair["point"] <= pair["ci"][1]
    cells = tmp_path / "results" / "tiny" / "cells" / "cartpole-swingup"
    assert sorted(p.name for p in (cells / "ppo-state").iterdir()) == ["seed0.json", "seed1.json"]
    machine = json.loads((cells / "ppo-state" / "seed0.json").read_text())["machine"]  # its seconds are this machine's
    assert machine["cpu_count"] == os.cpu_count() and "cpu_simd" in machine
    shutil.rmtree(tmp_path / "runs")  # another machine: the committed cell files are enough
    assert (tmp_path / "results" / "tiny" / "curves_seconds.png").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True)  # finished cells are skipped
    assert rerun.returncode == 0 and "ppo-state" in rerun.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # the script's online-agent test below covers it; this one adds the offline-perception spec
def test_structured_vs_unstructured_script_runs_a_spec(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\ntasks: [cartpole-swingup]\nagents: [ppo-state, ppo-keypoints]\nseeds: [0]\n"
                    "steps: 32\neval_every: 32\neval_episodes: 1\n"
                    "perception: {episodes: 2, autoencoder_steps: 2, dynamics_steps: 2}\n")
    script = Path(__file__).resolve().parent.parent / "experiments" / "structured_vs_unstructured.py"
    result = subprocess.run([sys.executable, str(script), "--spec", str(spec), "--runs", str(tmp_path / "runs"),
                             "--data", str(tmp_path / "data"), "--results", str(tmp_path / "results")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "results" / "tiny"
    assert (out / "results.json").exists() and (out / "keypoints_cartpole-swingup.png").stat().st_size > 0


def test_local_grid_runs_perception_and_agents_on_the_chosen_device(tmp_path, monkeypatch):
    import kp_rl.experiment as experiment

    seen = []
    monkeypatch.setattr(experiment, "perception_models",
                        lambda spec, task, data, runs, progress, device, prefixes:
                        seen.append(("perception", device)) or {})
    monkeypatch.setattr(experiment, "run_cell", lambda *args, device, **kw: seen.append(("cell", device)) or {})
    monkeypatch.setattr(experiment, "summarise", lambda *args, **kw: {})
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\ntasks: [cartpole-swingup]\nagents: [sac-state]\nseeds: [0, 1]\nsteps: 8\n")
    experiment.run_experiment(spec, runs=tmp_path, results=tmp_path / "results", device="cpu")
    assert seen == [("perception", "cpu"), ("cell", "cpu"), ("cell", "cpu")]
    with pytest.raises(ValueError, match="no CUDA device|cuda"):
        experiment.run_experiment(spec, runs=tmp_path, results=tmp_path / "results", device="cuda:7")


def test_grid_cells_checkpoint_at_every_evaluation(tmp_path, monkeypatch):
    """A pixel cell takes hours on a CPU core: a session that ends must lose at most one evaluation interval."""
    import kp_rl.agents
    from kp_rl import experiment

    calls = []
    monkeypatch.setattr(kp_rl.agents, "train_agent", lambda *args, **kw: calls.append(kw) or {})
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\ntasks: [cartpole-swingup]\nagents: [sac-state]\nseeds: [0]\nsteps: 80\n"
                    "eval_every: 20\n")
    experiment.run_cell(experiment.ExperimentSpec.from_yaml(spec), "cartpole-swingup", "sac-state", 0, None, tmp_path)
    assert calls[0]["checkpoint_every"] == calls[0]["eval_every"] == 20


def test_a_run_stopped_while_saving_keeps_its_previous_checkpoint_whole(tmp_path, monkeypatch):
    """A session that ends during a checkpoint's slow replay-buffer write must not leave a newer agent beside an
    older curve and buffer (it did: a resumed pixel run lost an evaluation and 1,250 transitions)."""
    from stable_baselines3 import SAC

    kwargs = dict(eval_every=8, checkpoint_every=8, eval_episodes=1, env_kwargs={"image_size": 32}, progress=False)
    save_buffer, calls = SAC.save_replay_buffer, []

    def stopped_at_the_second(self, path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the session ends half-way through the second checkpoint
        save_buffer(self, path)

    monkeypatch.setattr(SAC, "save_replay_buffer", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        train_agent("kp_rl/cartpole-swingup-v0", "sac-state", 24, tmp_path, **kwargs)
    monkeypatch.setattr(SAC, "save_replay_buffer", save_buffer)
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert curve["steps"] == [8] and curve["agent_steps"] == 8 and SAC.load(tmp_path / "agent.zip").num_timesteps == 8
    again = train_agent("kp_rl/cartpole-swingup-v0", "sac-state", 24, tmp_path, **kwargs)
    assert again["steps"] == [8, 16, 24] and again["done"]
    # a torn checkpoint left by an older version (agent and curve at different steps) is refused, not resumed
    torn = json.loads((tmp_path / "curve.json").read_text())
    (tmp_path / "curve.json").write_text(json.dumps({**torn, "agent_steps": 16, "done": False}))
    with pytest.raises(ValueError, match="torn checkpoint .the agent at 24 agent steps, its curve at 16"):
        train_agent("kp_rl/cartpole-swingup-v0", "sac-state", 32, tmp_path, **kwargs)


def test_replay_buffers_hold_the_budget_and_grow_when_a_run_is_extended(tmp_path):
    """SB3 allocates (and a checkpoint pickles) the whole buffer_size: a run sizes it to its budget, keeping the
    same transitions and samples; a bigger budget later grows it with what it holds."""
    import gymnasium
    from stable_baselines3.common.buffers import ReplayBuffer
    from stable_baselines3.common.save_util import load_from_pkl

    from kp_rl.agents import _size_replay_buffer

    kwargs = dict(eval_every=8, eval_episodes=1, env_kwargs={"image_size": 32}, progress=False)
    train_agent("kp_rl/cartpole-swingup-v0", "sac-state", 8, tmp_path / "run", **kwargs)
    buffer = load_from_pkl(tmp_path / "run" / "replay_buffer.pkl")
    assert get_agent("sac-state").hyperparameters["buffer_size"] == 100_000
    assert buffer.buffer_size == 8 and buffer.observations.shape[0] == 8
    held = buffer.pos  # the checkpoint is taken at step 8, before SB3 stores that step's transition
    first = buffer.observations[:held].copy()
    train_agent("kp_rl/cartpole-swingup-v0", "sac-state", 12, tmp_path / "run", **kwargs)
    buffer = load_from_pkl(tmp_path / "run" / "replay_buffer.pkl")
    assert buffer.buffer_size == 12 and buffer.pos > held and np.array_equal(buffer.observations[:held], first)

    space = gymnasium.spaces.Box(-1, 1, (2,), np.float32)
    full = ReplayBuffer(6, space, space)
    for i in range(7):  # one more than it holds: it has evicted, and is left as it is
        full.add(np.full((1, 2), i), np.full((1, 2), i), np.zeros((1, 2)), np.zeros(1), np.zeros(1), [{}])
    _size_replay_buffer(full, 10)
    assert full.buffer_size == 6 and full.pos == 1
    partial = ReplayBuffer(100, space, space)
    for i in range(3):
        partial.add(np.full((1, 2), i), np.full((1, 2), i), np.zeros((1, 2)), np.zeros(1), np.zeros(1), [{}])
    _size_replay_buffer(partial, 5)
    assert partial.buffer_size == 5 and partial.pos == 3 and not partial.full
    assert partial.observations[:3, 0, 0].tolist() == [0, 1, 2] and partial.sample(4).observations.shape == (4, 2)


def test_agent_run_folders_know_what_they_hold(model_path, tmp_path):
    from kp_rl.runs import RunMismatchError, read_run

    spec = get_agent("sac-state")
    kwargs = dict(eval_every=8, eval_episodes=1, env_kwargs={"image_size": 32}, progress=False)
    curve = train_agent("kp_rl/cartpole-swingup-v0", spec, 8, tmp_path / "run", seed=3, **kwargs)
    assert curve["budget"] == 8 and curve["agent_steps"] == 8
    recorded = read_run(tmp_path / "run")
    assert {k: recorded[k] for k in ("command", "stage", "agent", "algo", "env_id", "seed")} == {
        "command": "rl", "stage": "agent", "agent": "sac-state", "algo": "SAC",
        "env_id": "kp_rl/cartpole-swingup-v0", "seed": 3}
    assert recorded["policy"] == "MlpPolicy" and recorded["augmentation"] == "none"
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(RunMismatchError, match="holds policy='MlpPolicy', not policy='CnnPolicy'"):
        train_agent("kp_rl/cartpole-swingup-v0", dataclasses.replace(spec, policy="CnnPolicy"), 8, tmp_path / "run",
                    **kwargs)  # a catalog entry changed under a run: its saved agent is another one
    with pytest.raises(RunMismatchError, match="holds agent='sac-state', algo='SAC', observation='state', not "
                                               "agent='ppo-keypoints', algo='PPO', observation='keypoints'"):
        train_agent("kp_rl/cartpole-swingup-v0", "ppo-keypoints", 8, tmp_path / "run", model=model_path, **kwargs)
    with pytest.raises(RunMismatchError, match="env_id='kp_rl/cartpole-swingup-v0', not env_id='kp_rl/reacher-easy-v0'"):
        train_agent("kp_rl/reacher-easy-v0", spec, 8, tmp_path / "run", **kwargs)
    with pytest.raises(RunMismatchError, match="seed=3, not seed=0"):
        train_agent("kp_rl/cartpole-swingup-v0", spec, 8, tmp_path / "run", seed=0, **kwargs)
    with pytest.raises(ValueError, match="has trained 8 agent steps, more than the 4 asked for"):
        train_agent("kp_rl/cartpole-swingup-v0", spec, 4, tmp_path / "run", **kwargs)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert train_agent("kp_rl/cartpole-swingup-v0", spec, 8, tmp_path / "run", **kwargs) == curve  # finished
    # a keypoint agent records its model's checkpoint hash and resumes on it (here: another file is refused)
    agent = dataclasses.replace(get_agent("sac-keypoints"), hyperparameters={"learning_starts": 4, "batch_size": 4})
    train_agent("kp_rl/cartpole-swingup-v0", agent, 4, tmp_path / "kp", model=model_path, **kwargs)
    other = tmp_path / "other.pt"
    kp_rl.PerceptionModel(kp_rl.load(model_path).config, action_dim=1, with_dynamics=True).save(other)
    with pytest.raises(RunMismatchError, match="holds model_sha256="):
        train_agent("kp_rl/cartpole-swingup-v0", agent, 8, tmp_path / "kp", model=other, **kwargs)
    assert train_agent("kp_rl/cartpole-swingup-v0", agent, 8, tmp_path / "kp", **kwargs)["steps"] == [4, 8]


def test_every_agent_of_an_algorithm_shares_its_hyperparameters(tmp_path, monkeypatch):
    import shutil

    catalog = load_agent_catalog()
    for algo in ("SAC", "PPO"):
        specs = [s for s in catalog.values() if s.algo == algo]
        assert len({json.dumps(s.hyperparameters, sort_keys=True) for s in specs}) == 1, algo
        assert len({json.dumps(s.policy_kwargs, sort_keys=True) for s in specs}) == 1, algo
    assert catalog["sac-pixels"].hyperparameters["batch_size"] == catalog["sac-state"].hyperparameters["batch_size"]
    assert catalog["sac-pixels-drq"].augmentation == "random-shift" and catalog["sac-pixels"].augmentation == "none"
    assert catalog["sac-pixels-drq"].policy == "DrQCnnPolicy" and catalog["sac-pixels"].policy == "CnnPolicy"
    folder = tmp_path / "agents"
    shutil.copytree(kp_rl.agents.agents_dir(), folder)
    (folder / "sac-odd.yaml").write_text("algo: SAC\nobservation: state\nhyperparameters: {batch_size: 64}\n")
    monkeypatch.setenv("KP_RL_AGENTS", str(folder))
    with pytest.raises(ValueError, match=r"hyperparameters \['batch_size'\] differ from the SAC values every agent"):
        load_agent_catalog()
    (folder / "sac-odd.yaml").write_text("algo: PPO\nobservation: state\naugmentation: random-shift\n")
    with pytest.raises(ValueError, match="augmentation 'random-shift' is for SAC on pixels"):
        load_agent_catalog()
    (folder / "sac-odd.yaml").write_text("algo: SAC\nobservation: state\npolicy: DrQCnnPolicy\n")
    with pytest.raises(ValueError, match="policy DrQCnnPolicy is for SAC on pixels"):
        load_agent_catalog()


def test_random_shift_moves_whole_images_within_the_padding(tmp_path):
    import torch

    from kp_rl.sb3 import RandomShiftReplayBuffer, random_shift

    images = torch.zeros(64, 3, 16, 16, dtype=torch.uint8)
    images[:, :, 6:10, 6:10] = 255  # a square in the middle
    shifted = random_shift(images, pad=4, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    centres = [torch.nonzero(s[0]).float().mean(0) for s in shifted]
    moves = torch.stack(centres) - torch.tensor([7.5, 7.5])
    assert moves.abs().max() <= 4 and len({tuple(m.tolist()) for m in moves}) > 10  # every image its own shift
    assert all(int(s[0].sum()) == 255 * 16 for s in shifted)  # the square moved whole, nothing lost
    ramp = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(8, 2, 1, 1)
    shifted = random_shift(ramp, pad=4, generator=torch.Generator().manual_seed(1))
    offsets = torch.randint(0, 9, (8, 2), generator=torch.Generator().manual_seed(1)) - 4
    for image, (dy, dx) in zip(shifted, offsets.tolist()):  # the border repeats beyond the edge (replicate padding)
        rows, cols = (torch.arange(16) + dy).clamp(0, 15), (torch.arange(16) + dx).clamp(0, 15)
        assert image.equal(ramp[0][:, rows][:, :, cols])
    venv = make_vec_env("kp_rl/cartpole-swingup-v0", get_agent("sac-pixels-drq"), n_envs=1)  # NatureCNN: >= 36 px
    agent = kp_rl.agents.build_agent(get_agent("sac-pixels-drq"), venv)
    assert isinstance(agent.replay_buffer, RandomShiftReplayBuffer)
    agent.learning_starts, agent.batch_size = 8, 4
    agent.learn(12)  # samples, shifts and updates
    batch = agent.replay_buffer.sample(4)
    assert batch.observations.shape == (4, 9, 64, 64)

    # DrQ's one encoder: the critic's loss trains it, the actor reads it detached, the target keeps its own copy
    from stable_baselines3 import SAC

    from kp_rl.sb3 import DrQCnnPolicy

    policy = agent.policy
    assert isinstance(policy, DrQCnnPolicy) and policy.actor.features_extractor is policy.critic.features_extractor
    assert policy.critic_target.features_extractor is not policy.critic.features_extractor
    encoder = list(policy.critic.features_extractor.parameters())
    optimised = {name: {id(p) for group in opt.param_groups for p in group["params"]}
                 for name, opt in (("actor", policy.actor.optimizer), ("critic", policy.critic.optimizer))}
    assert {id(p) for p in encoder} <= optimised["critic"] and not {id(p) for p in encoder} & optimised["actor"]
    actions, _ = policy.actor.action_log_prob(batch.observations)
    policy.zero_grad(set_to_none=True)
    torch.cat(policy.critic(batch.observations, actions), dim=1).mean().backward()  # the actor's loss
    assert all(p.grad is None for p in encoder)
    assert all(p.grad is not None for p in policy.actor.mu.parameters())
    torch.cat(policy.critic(batch.observations, batch.actions), dim=1).mean().backward()  # the critic's loss
    assert all(p.grad is not None for p in encoder)
    agent.save(tmp_path / "agent.zip")
    loaded = SAC.load(tmp_path / "agent.zip", env=venv)
    assert isinstance(loaded.policy, DrQCnnPolicy)
    observation = venv.reset()
    assert np.allclose(loaded.predict(observation, deterministic=True)[0],
                       agent.predict(observation, deterministic=True)[0])
    venv.close()


def test_drq_agent_normalises_sampled_images_once_with_the_same_updates():
    # the catalog's DrQ agent takes its samples as floats divided by 255 (once per sample, not once per network
    # that reads them); its updates must be SB3's own, to the bit
    import torch
    from stable_baselines3.common.utils import set_random_seed

    spec = get_agent("sac-pixels-drq")
    params = []
    for normalize in (True, False):
        venv = make_vec_env("kp_rl/cartpole-swingup-v0", spec, n_envs=1)
        agent = kp_rl.agents.build_agent(spec, venv, seed=0)
        assert agent.replay_buffer.normalize_images  # what the catalog's agent gets
        agent.replay_buffer.normalize_images = normalize
        agent.learning_starts, agent.batch_size = 24, 8
        agent.learn(24)  # random-action warm-up: the same transitions for both
        batch = agent.replay_buffer.sample(2)
        assert batch.observations.dtype == (torch.float32 if normalize else torch.uint8)
        assert normalize is False or 0 <= float(batch.observations.min()) <= float(batch.observations.max()) <= 1
        set_random_seed(0)
        agent.train(gradient_steps=2, batch_size=8)
        params.append(agent.policy.state_dict())
        venv.close()
    assert all(params[0][name].equal(params[1][name]) for name in params[0])


def test_online_perception_learns_from_the_agents_own_steps_and_resumes(tmp_path):
    """No --model: the random prefix trains perception, refits follow the schedule, the replay buffer holds what
    the latest model sees, every frame perception trained on is an agent step, and a resume continues all of it."""
    from stable_baselines3.common.save_util import load_from_pkl

    from kp_rl.online import OnlinePerception

    spec = get_agent("sac-keypoints-belief")
    spec = dataclasses.replace(
        spec, hyperparameters={**spec.hyperparameters, "learning_starts": 20, "batch_size": 16},
        perception={"prefix": 20, "refit_every": 20, "autoencoder_steps": 6, "dynamics_steps": 6,
                    "refit_autoencoder_steps": 3, "refit_dynamics_steps": 3, "preset": "tiny"})
    env_kwargs = {"image_size": 32, "episode_steps": 80}  # cartpole: action repeat 8, 10 agent steps per episode
    kwargs = dict(eval_every=30, eval_episodes=1, env_kwargs=env_kwargs, progress=False)
    curve = train_agent("kp_rl/cartpole-swingup-v0", spec, 60, tmp_path, **kwargs)
    assert [fit["agent_steps"] for fit in curve["perception_fits"]] == [20, 40]
    assert [fit["frames"] for fit in curve["perception_fits"]] == [22, 44]  # 10 steps + the reset frame per episode
    identity = json.loads((tmp_path / "run.json").read_text())
    assert "model" not in identity and identity["perception"]["refit_every"] == 20
    model = kp_rl.load(tmp_path / "perception" / "dynamics")
    state = kp_rl.model.read_checkpoint(tmp_path / "perception" / "autoencoder")["train_state"]
    assert state["step"] == 9 and model.has_dynamics  # 6 steps, then 3 more at the refit

    # the replay buffer's observations are what the final model makes of the recorded frames
    buffer = load_from_pkl(tmp_path / "replay_buffer.pkl")
    venv = make_vec_env("kp_rl/cartpole-swingup-v0", spec, model, env_kwargs=env_kwargs)
    online = OnlinePerception(spec.schedule, tmp_path, venv)
    assert sum(len(e["image"]) - 1 for e in online.episodes) == 60  # every agent step, recorded once
    observations = [online.observations(e)[0] for e in online.episodes]
    for row, (e, t) in online.buffer_map.items():
        if row < buffer.pos:
            np.testing.assert_allclose(buffer.observations[row, 0], observations[e][t], atol=1e-5)
            np.testing.assert_allclose(buffer.next_observations[row, 0], observations[e][t + 1], atol=1e-5)
    venv.close()

    again = train_agent("kp_rl/cartpole-swingup-v0", spec, 90, tmp_path, **kwargs)  # a bigger budget continues
    assert [fit["agent_steps"] for fit in again["perception_fits"]] == [20, 40, 61, 80]  # 60 was due at the end: done first on the resume
    with pytest.raises(ValueError, match="perception"):  # another schedule is another run
        train_agent("kp_rl/cartpole-swingup-v0", dataclasses.replace(spec, perception={"prefix": 10}), 120, tmp_path,
                    **kwargs)


def test_online_agents_can_start_from_a_shared_prefix(tmp_path):
    """A grid's seeds share the random-action prefix and its first fit; each counts those steps and fine-tunes
    its own copy."""
    from stable_baselines3.common.save_util import load_from_pkl

    from kp_rl.online import OnlinePerception, shared_prefix

    spec = get_agent("sac-cnn-vrnn")
    spec = dataclasses.replace(
        spec, hyperparameters={**spec.hyperparameters, "learning_starts": 15, "batch_size": 16},
        perception={"prefix": 15, "refit_every": 20, "autoencoder_steps": 6, "dynamics_steps": 6,
                    "refit_autoencoder_steps": 3, "refit_dynamics_steps": 3, "preset": "tiny"})
    env_kwargs = {"image_size": 32, "episode_steps": 80}
    prefix = shared_prefix(spec.schedule, "cartpole-swingup", "cnn", True, tmp_path / "prefix", env_kwargs=env_kwargs)
    assert json.loads((prefix / "fit.json").read_text())["agent_steps"] == 20  # two whole 10-step episodes
    kwargs = dict(eval_every=20, eval_episodes=1, env_kwargs=env_kwargs, progress=False)
    curve = train_agent("kp_rl/cartpole-swingup-v0", spec, 50, tmp_path / "run", perception_prefix=prefix, **kwargs)
    assert [(f["agent_steps"], f.get("shared")) for f in curve["perception_fits"]] == [(20, True), (35, None)]
    assert curve["steps"] == [40, 50]  # the prefix's steps are the first 20 of the budget
    model = kp_rl.load(tmp_path / "run" / "perception" / "dynamics")
    assert model.representation == "cnn"
    assert kp_rl.model.read_checkpoint(tmp_path / "prefix" / "dynamics")["train_state"]["step"] == 6  # untouched
    # the prefix is reused only by the schedule that fitted it: another recipe is refused, not silently given it
    assert shared_prefix(spec.schedule, "cartpole-swingup", "cnn", True, prefix, env_kwargs=env_kwargs) == prefix
    changed = dataclasses.replace(spec.schedule, config={"keypoints": {"reference": "other"}})
    with pytest.raises(ValueError, match="fitted with another perception schedule .config differ"):
        shared_prefix(changed, "cartpole-swingup", "cnn", True, prefix, env_kwargs=env_kwargs)
    # a fit finished by a later process counts the earlier sessions' training time (logged in the stages'
    # histories; every agent's wall-clock includes it): here an earlier process trained both stages for 2 x 1,000 s
    (prefix / "fit.json").unlink()
    for stage in ("autoencoder", "dynamics"):
        history = json.loads((prefix / stage / "history.json").read_text())
        history["train"] = [{**row, "steps_per_s": row["step"] / 1000} for row in history["train"][-1:]]
        (prefix / stage / "history.json").write_text(json.dumps(history))
    assert shared_prefix(spec.schedule, "cartpole-swingup", "cnn", True, prefix, env_kwargs=env_kwargs) == prefix
    assert 2000 <= json.loads((prefix / "fit.json").read_text())["seconds"] < 2100
    buffer = load_from_pkl(tmp_path / "run" / "replay_buffer.pkl")
    venv = make_vec_env("kp_rl/cartpole-swingup-v0", spec, model, env_kwargs=env_kwargs)
    online = OnlinePerception(spec.schedule, tmp_path / "run", venv)
    assert sum(len(e["image"]) - 1 for e in online.episodes) == 50  # every step of the budget, recorded once
    observations = [online.observations(e)[0] for e in online.episodes]
    assert buffer.pos == 49  # SB3 stops before storing the budget's last step
    for row, (e, t) in online.buffer_map.items():
        if row < buffer.pos:
            np.testing.assert_allclose(buffer.observations[row, 0], observations[e][t], atol=1e-5)
    venv.close()


def test_grid_with_online_agents_shares_the_prefix_and_reports(tmp_path):
    """The structured-vs-unstructured script on a grid with an online keypoint agent: one shared prefix per task,
    every env step counted, the report beside the published figures; --report-only from the committed cells."""
    catalog = tmp_path / "agents"
    shutil.copytree(Path(__file__).resolve().parent.parent / "agents", catalog)
    text = (catalog / "sac-keypoints-belief.yaml").read_text().split("perception:")[0]
    (catalog / "sac-keypoints-belief.yaml").write_text(
        text + "perception: {prefix: 100, refit_every: 100, autoencoder_steps: 3, dynamics_steps: 3,\n"
        "  refit_autoencoder_steps: 2, refit_dynamics_steps: 2, preset: cpu,\n"
        "  config: {keypoints: {num_keypoints: 4, base_filters: 4}, dynamics: {rnn_units: 16, latent_dim: 4}}}\n")
    defaults = (catalog / "defaults.yaml").read_text().replace("learning_starts: 1000", "learning_starts: 100")
    (catalog / "defaults.yaml").write_text(defaults.replace("batch_size: 256", "batch_size: 16"))
    spec = tmp_path / "tiny.yaml"
    spec.write_text("name: tiny\ntasks: [cartpole-swingup]\nagents: [sac-keypoints-belief, sac-state]\nseeds: [0, 1]\n"
                    "steps: 140\neval_every: 70\neval_episodes: 1\nrandom_episodes: 1\ncompare: sac-keypoints-belief\n"
                    "shared_prefix: true\n")
    script = Path(__file__).resolve().parent.parent / "experiments" / "structured_vs_unstructured.py"
    dirs = ["--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--results", str(tmp_path / "results")]
    env = {**os.environ, "KP_RL_AGENTS": str(catalog)}
    result = subprocess.run([sys.executable, str(script), "--spec", str(spec), *dirs], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "results" / "tiny"
    summary = json.loads((out / "results.json").read_text())["summary"]
    row = summary["cartpole-swingup"]["sac-keypoints-belief"]
    assert row["env_steps"] == 140 * 8 and row["pretrained_perception_env_steps"] == 0 and row["perception_fits"] == 1
    prefixes = list((out / "prefixes" / "cartpole-swingup").iterdir())  # committed beside the cells
    assert [p.name for p in prefixes] == ["sac-keypoints-belief-prefix"]  # one for both seeds
    shared = json.loads((prefixes[0] / "fit.json").read_text())["seconds"]  # the first fit, made once for both
    curves = json.loads((out / "results.json").read_text())["curves"]
    own = [curves[f"cartpole-swingup/sac-keypoints-belief/seed{s}"]["seconds"][-1] for s in (0, 1)]
    assert row["wall_clock_s"] == pytest.approx(np.mean(own) + shared)  # counted in every agent's wall-clock
    readme = (out / "README.md").read_text()
    assert "published: DrQ" in readme and "759±92" in readme and "P(sac-keypoints-belief > sac-state)" in readme
    assert (out / "keypoints_cartpole-swingup.png").exists()
    shutil.rmtree(tmp_path / "runs")
    again = subprocess.run([sys.executable, str(script), "--spec", str(spec), "--report-only", *dirs],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["summary"]["cartpole-swingup"].keys() == summary[
        "cartpole-swingup"].keys()
    # a fresh machine (no runs/) that adds a seed starts it from the committed prefix, not from a refit
    fitted = (prefixes[0] / "fit.json").read_text()
    spec.write_text(spec.read_text().replace("seeds: [0, 1]", "seeds: [0, 1, 2]").replace(", sac-state]", "]"))
    more = subprocess.run([sys.executable, str(script), "--spec", str(spec), *dirs], capture_output=True, text=True,
                          env=env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert (prefixes[0] / "fit.json").read_text() == fitted
    assert not (tmp_path / "runs" / "tiny" / "models").exists()
    run = json.loads((tmp_path / "runs" / "tiny" / "cartpole-swingup" / "sac-keypoints-belief" / "seed2" /
                      "run.json").read_text())
    assert Path(run["perception_prefix"]) == prefixes[0].resolve()


def test_a_perception_fit_leaves_the_agents_random_stream_alone(tmp_path):
    import torch

    from kp_rl.online import PerceptionSchedule, fit_perception

    schedule = PerceptionSchedule(autoencoder_steps=2, dynamics_steps=2, preset="tiny")
    model = kp_rl.PerceptionModel(schedule.model_config(), action_dim=1, with_dynamics=True)
    rng = np.random.default_rng(0)
    episodes = [{"image": rng.integers(0, 256, (12, 32, 32, 3)).astype(np.uint8),
                 "action": rng.uniform(-1, 1, (12, 1)).astype(np.float32),
                 "reward": rng.uniform(0, 1, 12).astype(np.float32)} for _ in range(2)]
    fit_perception(model, episodes, schedule, 0, tmp_path)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    fit_perception(model, episodes, dataclasses.replace(schedule, refit_autoencoder_steps=1, refit_dynamics_steps=1), 1,
                   tmp_path)  # resumes
    assert torch.equal(torch.rand(3), expected)


def test_an_interrupted_perception_fit_resumes_its_weights(tmp_path):
    """A shared prefix's fit, interrupted and resumed by a fresh process (a freshly built model), continues from the
    checkpointed weights, not from new random ones under the stored optimiser state and step."""
    import torch

    from kp_rl.online import PerceptionSchedule, fit_perception

    schedule = PerceptionSchedule(autoencoder_steps=3, dynamics_steps=3, preset="tiny")
    rng = np.random.default_rng(0)
    episodes = [{"image": rng.integers(0, 256, (12, 32, 32, 3)).astype(np.uint8),
                 "action": rng.uniform(-1, 1, (12, 1)).astype(np.float32),
                 "reward": rng.uniform(0, 1, 12).astype(np.float32)} for _ in range(2)]
    fitted = kp_rl.PerceptionModel(schedule.model_config(), action_dim=1, with_dynamics=True)
    fit_perception(fitted, episodes, schedule, 0, tmp_path)
    torch.manual_seed(123)  # another initialisation than the first model's
    resumed = kp_rl.PerceptionModel(schedule.model_config(), action_dim=1, with_dynamics=True)
    fit_perception(resumed, episodes, schedule, 0, tmp_path)  # both stages finished: nothing left to train
    for (name, a), b in zip(fitted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # a refit resumes the VRNN's run with the VRNN's weights alone: the autoencoder it has just refitted is kept
    before = {k: v.clone() for k, v in resumed.autoencoder.state_dict().items()}
    fit_perception(resumed, episodes, dataclasses.replace(schedule, refit_autoencoder_steps=1, refit_dynamics_steps=1), 1,
                   tmp_path)
    refitted = kp_rl.model.read_checkpoint(tmp_path / "autoencoder")["state_dict"]
    for name, value in resumed.autoencoder.state_dict().items():
        assert torch.equal(value, refitted[f"autoencoder.{name}"]), name
    assert any(not torch.equal(before[k], v) for k, v in resumed.autoencoder.state_dict().items())
