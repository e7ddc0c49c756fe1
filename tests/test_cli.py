"""The kp-rl command as a new user meets it: bad input gets one line and changes nothing; help explains itself."""

import json
import shutil
import subprocess
import sys

import pytest

from kp_rl.cli import build_parser, main
from kp_rl.model import read_checkpoint

QUIET = ["--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, a finished keypoints run and dynamics run on it, a finished sac-state run, and some junk."""
    root = tmp_path_factory.mktemp("cli")
    steps = ["--steps", "4", "--quiet"]
    assert main(["collect", "--env", "cartpole-swingup", "--episodes", "3", "--max-steps", "12", "--image-size", "32",
                 "--out", str(root / "data"), "--quiet"]) == 0
    assert main(["train", "keypoints", "--data", str(root / "data"), "--out", str(root / "kp"), "--preset", "tiny",
                 *steps]) == 0
    assert main(["train", "dynamics", "--data", str(root / "data"), "--keypoints", str(root / "kp"),
                 "--out", str(root / "dyn"), *steps]) == 0
    assert main(["rl", "--env", "cartpole-swingup", "--agent", "sac-state", "--steps", "8", "--eval-every", "8",
                 "--eval-episodes", "1", "--out", str(root / "sac"), "--quiet"]) == 0
    shutil.copytree(root / "data", root / "reacher-data")  # the same frames, claimed by another task
    manifest = json.loads((root / "reacher-data" / "manifest.json").read_text())
    (root / "reacher-data" / "manifest.json").write_text(json.dumps({**manifest, "env_id": "kp_rl/reacher-easy-v0"}))
    (root / "afile").write_text("not a folder")
    (root / "corrupt.pt").write_bytes(b"junk")
    (root / "bogus-hyper.yaml").write_text("algo: SAC\nobservation: state\nhyperparameters: {bogus: 1}\n")
    (root / "broken.yaml").write_text("algo: SAC\nobservation: [\n")
    (root / "tiny.yaml").write_text("preset: tiny\n")
    return root


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


RL = ["rl", "--env", "cartpole-swingup", "--agent", "sac-state", "--steps", "8", "--eval-every", "8",
      "--eval-episodes", "1", *QUIET]
KP = ["train", "keypoints", "--data", "{data}", *QUIET]
DYN = ["train", "dynamics", "--data", "{data}", *QUIET]
# (argv, the expected error line's text); {name} is a path in the world folder
BAD_INPUTS = [
    # a run folder belongs to the command that made it
    (["rl", "--env", "cartpole-swingup", "--agent", "sac-keypoints-belief", "--model", "{dyn}", "--steps", "8",
      "--out", "{sac}", *QUIET],
     "run folder {sac} holds agent='sac-state', observation='state', not agent='sac-keypoints-belief', "
     "observation='keypoints+belief'; choose another output folder"),
    (["rl", "--env", "cartpole-swingup", "--agent", "ppo-state", "--steps", "8", "--out", "{sac}"],
     "holds agent='sac-state', algo='SAC', not agent='ppo-state', algo='PPO'"),
    (["rl", "--env", "reacher-easy", "--agent", "sac-state", "--steps", "8", "--out", "{sac}"],
     "holds env_id='kp_rl/cartpole-swingup-v0', not env_id='kp_rl/reacher-easy-v0'"),
    (RL + ["--out", "{sac}", "--seed", "1"], "holds seed=0, not seed=1"),
    (RL[:6] + ["4", "--out", "{sac}"], "has trained 8 agent steps, more than the 4 asked for"),
    (RL[:-2] + ["3", "--out", "{sac}"], "{sac} evaluates with 1 episodes, not 3"),
    (RL[:7] + ["--eval-every", "4", "--out", "{sac}"], "finished with an evaluation every 8 agent steps, not 4"),
    (KP + ["--out", "{kp}", "--preset", "cpu"], "run folder {kp} holds preset='tiny', not preset='cpu'"),
    (KP + ["--out", "{kp}", "--batch-size", "2"], "trained with train.batch_size=4, not train.batch_size=2"),
    (KP + ["--out", "{kp}", "--steps", "2"], "has trained 4 autoencoder steps, more than the 2 asked for"),
    (KP + ["--out", "{kp}", "--config", "{tiny.yaml}", "--preset", "cpu"], "sets preset 'tiny', but preset 'cpu'"),
    (["train", "cnn", "--data", "{data}", "--out", "{kp}"], "holds representation='keypoints', not "
                                                            "representation='cnn'"),
    (["train", "keypoints", "--data", "{reacher-data}", "--out", "{kp}"],
     "holds env_id='kp_rl/cartpole-swingup-v0', not env_id='kp_rl/reacher-easy-v0'"),
    (DYN + ["--out", "{kp}"], "holds stage='autoencoder', not stage='dynamics'"),
    (DYN + ["--out", "{dyn}", "--keypoints", "{corrupt.pt}"], "cannot read checkpoint {corrupt.pt}"),
    (DYN + ["--out", "{dyn}", "--keypoints", "{dyn}"], "holds model_sha256="),
    (DYN + ["--out", "{dyn}", "--steps", "2"], "has trained 4 dynamics steps, more than the 2 asked for"),
    (DYN + ["--out", "{dyn}", "--ablation", "deterministic"], "trained with dynamics.stochastic=True, not "
                                                              "dynamics.stochastic=False"),
    (DYN + ["--out", "{dyn}", "--batch-size", "3"], "train.dynamics_batch_size=8, not train.dynamics_batch_size=3"),
    (DYN + ["--out", "{new}", "--keypoints", "{kp}", "--preset", "cpu"], "trained with preset 'tiny', not 'cpu'"),
    (DYN + ["--out", "{new}"], "train dynamics needs --keypoints RUN"),
    (KP + ["--out", "{new}", "--keypoints", "{kp}"], "--keypoints is for train dynamics"),
    # --out naming a file, here or above
    (KP + ["--out", "{afile}"], "output folder {afile}: {afile} is a file, not a folder"),
    (RL + ["--out", "{afile}/run"], "output folder {afile}/run: {afile} is a file, not a folder"),
    (["eval", "--model", "{kp}", "--data", "{data}", "--out", "{afile}"], "{afile} is a file, not a folder"),
    (["inspect", "{data}", "--out", "{afile}"], "{afile} is a file, not a folder"),
    (["demo", "--quick", "--out", "{afile}"], "{afile} is a file, not a folder"),
    (["collect", "--env", "cartpole-swingup", "--episodes", "3", "--out", "{afile}"], "is a file, not a folder"),
    # bad values and files
    (RL + ["--out", "{new}", "--model", "{dyn}"], "agent sac-state (state observations) takes no model"),
    (["rl", "--env", "cartpole-swingup", "--agent", "sac-keypoints", "--steps", "8", "--out", "{new}"],
     "needs --model"),
    (["rl", "--env", "cartpole-swingup", "--agent", "sac-keypoints", "--steps", "8", "--out", "{new}", "--model",
      "{corrupt.pt}"], "cannot read checkpoint"),
    (["rl", "--env", "nope/foo-v0", "--agent", "sac-state", "--steps", "8", "--out", "{new}"], "unknown env id"),
    (["rl", "--env", "cartpole-flip", "--agent", "sac-state", "--steps", "8", "--out", "{new}"],
     "unknown task 'cartpole-flip'"),
    (["rl", "--env", "cartpole-swingup", "--agent", "sac-magic", "--steps", "8", "--out", "{new}"],
     "unknown agent 'sac-magic'"),
    (["rl", "--env", "cartpole-swingup", "--agent", "{bogus-hyper.yaml}", "--steps", "8", "--out", "{new}", *QUIET],
     "SAC rejects its hyperparameters / policy_kwargs"),  # raised once the envs exist
    (["rl", "--env", "cartpole-swingup", "--agent", "{broken.yaml}", "--steps", "8", "--out", "{new}"],
     "not valid YAML"),
    (RL[:6] + ["0", "--out", "{new}"], "argument --steps: must be >= 1, got 0"),
    (RL + ["--out", "{new}", "--eval-every", "0"], "argument --eval-every: must be >= 1"),
    (["eval", "--model", "{corrupt.pt}", "--data", "{data}"], "cannot read checkpoint"),
    (KP + ["--data", "{new}", "--out", "{new}2"], "dataset directory not found"),
    (KP + ["--out", "{new}", "--config", "{new}.yaml"], "config file not found"),
    (["collect", "--env", "cartpole-swingup", "--episodes", "3", "--max-steps", "5", "--image-size", "32",
      "--out", "{data}"], "holds a dataset with max_steps=12, not 5; collect into another directory"),
    (["collect", "--env", "cartpole-flip", "--episodes", "3", "--out", "{new}"], "unknown task 'cartpole-flip'"),
    (["run", "{new}.yaml", "--runs", "{new}"], "experiment spec not found"),
    (["run", "{broken.yaml}", "--runs", "{new}"], "broken.yaml: not valid YAML"),
    (KP + ["--out", "{new}", "--config", "{broken.yaml}"], "broken.yaml: not valid YAML"),
    (["train", "keypoints", "--data", "{data}", "--out", "{new}", "--streaming", "sometimes"], "invalid choice"),
    (["catalog", "tasks"], "invalid choice: 'tasks'"),
    ([], "the following arguments are required: COMMAND"),
]


def test_bad_inputs_get_one_line_and_change_nothing(world, cli):
    names = {p.name for p in world.iterdir()}
    before = _snapshot(world)
    paths = {f"{{{name}}}": str(world / name) for name in names | {"new"}}

    def fill(text: str) -> str:
        for name, path in paths.items():
            text = text.replace(name, path)
        return text

    for argv, expected in BAD_INPUTS:
        argv = [fill(a) for a in argv]
        code, _, err = cli(*argv)
        line = fill(expected)
        assert code == 2 and err.count("\n") == 1 and err.startswith("kp-rl: error: ") and line in err, (argv, err)
    assert {p.name for p in world.iterdir()} == names  # no folder left behind
    assert _snapshot(world) == before  # run and data folders byte-for-byte unchanged


def test_bigger_steps_extend_finished_runs_alike_for_train_and_rl(world, cli, tmp_path):
    for name in ("kp", "dyn", "sac"):
        shutil.copytree(world / name, tmp_path / name)
    kp, dyn, sac = (tmp_path / n for n in ("kp", "dyn", "sac"))
    assert cli("train", "keypoints", "--data", world / "data", "--out", kp, "--steps", "6", *QUIET)[0] == 0
    assert read_checkpoint(kp)["train_state"]["step"] == 6
    code, out, _ = cli("train", "dynamics", "--data", world / "data", "--out", dyn, "--steps", "6", *QUIET)
    assert code == 0 and read_checkpoint(dyn)["train_state"]["step"] == 6  # --keypoints: the recorded run
    code, out, _ = cli(*RL[:6], "12", "--eval-every", "4", "--out", sac)
    assert code == 0 and "sac-state on kp_rl/cartpole-swingup-v0" in out
    assert json.loads((sac / "curve.json").read_text())["steps"] == [8, 12]
    assert cli(*RL[:6], "12", "--out", sac)[0] == 0  # finished: its curve again


def test_an_error_after_the_envs_exist_is_one_line(world):
    """A failing kp-rl rl whose envs were made: one line on stderr (no EGL noise at exit), no folder left."""
    cmd = [sys.executable, "-m", "kp_rl.cli", "rl", "--env", "cartpole-swingup", "--agent",
           str(world / "bogus-hyper.yaml"), "--steps", "8", "--out", str(world / "fresh" / "run"), "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "unexpected keyword argument 'bogus'" in result.stderr
    assert not (world / "fresh").exists()


def _actions(parser):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):  # sub-commands
            for name, sub in action.choices.items():
                yield from ((f"{name} {a.dest}", a) for a in sub._actions)


def test_every_flag_explains_itself_with_its_default(capsys):
    for where, action in _actions(build_parser()):
        if action.dest == "help":
            continue
        assert action.help, where
        flag = bool(action.option_strings)
        if flag and not action.required and action.nargs != 0:
            assert "default" in action.help, where  # every optional value names its default
        assert "``" not in action.help, where
    for command in ("", "collect", "inspect", "train", "eval", "rl", "run", "demo", "catalog"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([*command.split(), "--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "usage:" in out and "``" not in out and ":func:" not in out, command


def test_catalogs_are_listed(cli):
    code, out, _ = cli("catalog")
    assert code == 0
    assert any(line.startswith("kp_rl/reacher-easy-v0") and line.endswith("target") for line in out.splitlines())
    assert any(line.split()[:3] == ["sac-keypoints-belief", "SAC", "keypoints+belief"] for line in out.splitlines())
    assert "sac-state" not in cli("catalog", "envs")[1]


def test_quick_and_full_demo_keep_their_own_folders(cli, tmp_path, monkeypatch):
    import kp_rl.demo

    seen = []
    monkeypatch.setattr(kp_rl.demo, "run_demo", lambda **kw: seen.append(kw))
    monkeypatch.chdir(tmp_path)
    assert cli("demo", "--quick")[0] == 0 and cli("demo")[0] == 0
    quick, full = seen
    assert quick["quick"] and not full["quick"]
    for key in ("out", "data", "runs"):
        assert quick[key] != full[key] and full[key] not in quick[key].parents and quick[key] not in full[key].parents
    assert str(full["data"]) == "data/demo-cartpole" and str(full["out"]) == "results/demo"
