"""The documentation's examples run: every kp_rl module's doctests (each module that has examples runs some)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import kp_rl

MODULES = sorted(m.name for m in pkgutil.iter_modules(kp_rl.__path__, "kp_rl."))


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    has_examples = ">>> " in (importlib.util.find_spec(name).loader.get_source(name) or "")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert (result.attempted > 0) == has_examples  # examples written are examples run
