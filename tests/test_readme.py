"""The README's quickstart and Python examples run top to bottom on a fresh folder (at tiny sizes)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

# what the test shrinks (each must stay in the README: a changed example fails here until the table follows)
SMALLER = {
    "--episodes 30": "--episodes 2 --max-steps 20",
    "--steps 1000": "--steps 2",
    "--steps 2000": "--steps 2",
    "agent.learn(2_000)": "agent.learn(110)",
    "buffer_size=20_000": "buffer_size=200",
    "agent.learn(500,": "agent.learn(105,",
    "log_every=250": "log_every=50",
}


def shrink(text: str) -> str:
    for big, small in SMALLER.items():
        text = text.replace(big, small)
    return text


@pytest.mark.timeout(900)
def test_quickstart_and_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kp_rl import cli

    for big in SMALLER:
        assert big in README, f"the README no longer has {big!r}: update SMALLER"
    quickstart = README[README.index("## Quickstart"):]
    commands = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
    python_blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(python_blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for line in shrink(commands).splitlines():
        argv = shlex.split(line.split("#")[0])
        assert argv[0] == "kp-rl"
        assert cli.main([*argv[1:], "--quiet"] if argv[1] != "collect" else [*argv[1:], "--quiet"]) == 0, line
    namespace: dict = {"__name__": "__readme__"}
    for block in python_blocks:
        exec(compile(shrink(block), "README.md", "exec"), namespace)  # noqa: S102: the README's own code
