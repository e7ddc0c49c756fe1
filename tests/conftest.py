import os

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`slow` tests (end-to-end runs whose parts the fast suite covers) are deselected unless `-m` names them
    (`-m slow`, or `-m "slow or not slow"` for everything)."""
    if "slow" in (config.getoption("-m") or ""):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


@pytest.fixture
def cli(capsys):
    """Run ``kp-rl argv`` in this process: (exit status, stdout, stderr)."""
    from kp_rl.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def checker_findings():
    """Run Gymnasium's and SB3's env checkers on an env; return what they warned about (errors raise).

    Gymnasium's note that a wrapped env "is different from the unwrapped version" is left out: it says only
    that the checker was given a wrapper, which is the point of checking one.
    """
    import re
    import warnings

    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    def run(env) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env)
            sb3_check_env(env)
        messages = [re.sub(r"\x1b\[[0-9;]*m", "", str(w.message)) for w in caught]
        return sorted(m for m in messages if "is different from the unwrapped version" not in m)

    return run


INFINITE_BOX = ["WARN: A Box observation space maximum value is infinity. This is probably too high.",
                "WARN: A Box observation space minimum value is -infinity. This is probably too low."]
