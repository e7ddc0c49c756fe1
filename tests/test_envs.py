import subprocess
import sys

import gymnasium as gym
import mujoco
import numpy as np
import pytest

import kp_rl
from kp_rl.envs import UnknownTaskError, camera_matrix, get_spec, load_catalog, make_env, pixels_to_unit, project_points

REQUIRED = ["cartpole-swingup", "cartpole-balance", "reacher-easy", "cheetah-run", "finger-spin", "walker-walk",
            "ball_in_cup-catch", "acrobot-swingup", "pendulum-swingup", "hopper-stand", "manipulator-bring_ball"]


def test_catalog_has_standard_tasks_with_pixel_dmc_action_repeats():
    names = {s.name for s in load_catalog().values()}
    assert set(REQUIRED) <= names
    assert get_spec("cartpole-swingup").action_repeat == 8
    assert get_spec("walker-walk").action_repeat == 2
    assert get_spec("kp_rl/cheetah-run-v0").action_repeat == 4
    assert get_spec("quadruped-walk").camera == 2


@pytest.mark.parametrize("name", REQUIRED)
def test_every_task_makes_and_steps(name):
    env = gym.make(f"kp_rl/{name}-v0")
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
    assert env.action_space.dtype == np.float32 and np.all(env.action_space.low == -1)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert isinstance(reward, float) and not terminated
    assert info["body_pixels"].shape == (len(env.unwrapped.body_names), 2)
    assert info["state"].dtype == np.float32
    env.close()


def test_env_checkers_pass(checker_findings):
    env = gym.make("kp_rl/cartpole-swingup-v0", render_mode="rgb_array")
    assert checker_findings(env) == []
    env.close()


def test_same_seed_same_frames_and_episode_length():
    env = make_env("cartpole-swingup", image_size=32)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(5)]
    runs = []
    for _ in range(2):
        frames = [env.reset(seed=7)[0]] + [env.step(a)[0] for a in actions]
        runs.append(np.stack(frames))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(env.reset(seed=8)[0], runs[0][0])
    steps, done = 0, False
    while not done:
        *_, terminated, truncated, _ = env.step(actions[0])
        steps, done = steps + 1, terminated or truncated
    assert steps == env.task_spec.max_episode_steps == 125
    env.close()


def test_image_size_and_render_mode():
    env = gym.make("kp_rl/reacher-easy-v0", image_size=32, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32, 32, 3)
    np.testing.assert_array_equal(env.render(), obs)
    env.close()


def test_shadow_switch_changes_pixels():
    frames = []
    for shadows in (False, True):
        env = make_env("walker-walk", shadows=shadows, reflections=shadows)
        frames.append(env.reset(seed=0)[0].astype(int))
        env.close()
    assert np.abs(frames[0] - frames[1]).sum() > 0


@pytest.mark.parametrize("name", ["cartpole-swingup", "reacher-easy", "walker-walk"])
def test_body_projection_matches_rendered_marker(name):
    """Project every geom's centre and check it lands on that geom's pixels in a segmentation render."""
    env = make_env(name, image_size=64)
    env.reset(seed=1)
    for _ in range(3):
        env.step(env.action_space.sample())
    model, data = env._model, env._data
    size = env.task_spec.image_size
    matrix = camera_matrix(model, data, env.task_spec.camera, size, size)
    renderer = mujoco.Renderer(model, size, size)
    renderer.enable_segmentation_rendering()
    renderer.update_scene(data, camera=env.task_spec.camera)
    seg = renderer.render()[..., 0]  # geom id per pixel
    renderer.close()
    checked = 0
    for geom in range(model.ngeom):
        rows, cols = np.nonzero(seg == geom)
        if len(rows) < 12 or model.geom_type[geom] == mujoco.mjtGeom.mjGEOM_PLANE:
            continue
        col, row = project_points(matrix, data.geom_xpos[geom][None])[0]
        # the centre of a compact geom projects inside its silhouette's bounding box, near its centroid
        assert rows.min() - 1.5 <= row <= rows.max() + 1.5 and cols.min() - 1.5 <= col <= cols.max() + 1.5
        checked += 1
    assert checked >= 1
    # body coordinates reported in info use the same projection
    np.testing.assert_allclose(env.body_pixels(), project_points(matrix, data.xipos[1:]), atol=1e-4)
    env.close()


def test_pixels_to_unit_orientation():
    unit = pixels_to_unit(np.array([[0.0, 0.0], [63.0, 63.0]]), 64)
    np.testing.assert_allclose(unit, [[-1, 1], [1, -1]])


def test_bad_input_errors():
    with pytest.raises(UnknownTaskError, match="unknown task 'cartpole-flip'"):
        make_env("cartpole-flip")
    with pytest.raises(ValueError, match="image_size"):
        make_env("cartpole-swingup", image_size=3)
    with pytest.raises(TypeError, match="unknown environment option"):
        make_env("cartpole-swingup", colour="red")
    env = make_env("cartpole-swingup")
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action shape"):
        env.step(np.zeros(3))
    env.close()


def test_task_objects_that_are_not_bodies_are_tracked():
    """reacher's target is a geom of the world body: named in info and projected onto its pixels."""
    env = make_env("reacher-easy", image_size=64)
    targets = []
    for seed in (0, 1):
        obs, info = env.reset(seed=seed)
        assert info["object_names"] == env.object_names == ("arm", "hand", "finger", "target")
        assert info["object_pixels"].shape == (4, 2)
        np.testing.assert_array_equal(info["object_pixels"][:3], info["body_pixels"])
        col, row = np.round(info["object_pixels"][-1]).astype(int)
        red, green, blue = obs[row, col].astype(int)
        assert red > green + 40 and red > blue + 40  # the target's reddish material
        targets.append(info["object_pixels"][-1])
    assert np.abs(targets[0] - targets[1]).sum() > 1  # placed anew each episode
    env.close()
    acrobot = make_env("acrobot-swingup", image_size=32)
    assert acrobot.reset(seed=0)[1]["object_names"][-1] == "target"  # a site: the reward's goal
    acrobot.close()
    with pytest.raises(ValueError, match="no geom or site"):
        make_env("cartpole-swingup", objects=["ghost"])


def test_an_unclosed_env_exits_silently():
    """The README quickstart without close(): the renderer is released before MuJoCo tears EGL down."""
    code = ("import gymnasium as gym, kp_rl\n"
            "env = gym.make('kp_rl/cartpole-swingup-v0', image_size=32)\n"
            "env.reset(seed=0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ""
    failing = code + "raise SystemExit('kp-rl: error: something')\n"  # an error raised while envs are open
    result = subprocess.run([sys.executable, "-c", failing], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "kp-rl: error: something\n"
