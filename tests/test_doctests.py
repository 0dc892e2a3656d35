"""The docstring examples of every fingrpo module run (the fast suite): a documented call that stops
working fails here. Examples that need the real model, data files or a server say ``# doctest: +SKIP``."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "fingrpo").rglob("*.py") if p.name != "__main__.py"
) + ["flows.retrain", "flows.deploy"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # examples name repository paths (data/finqa/...)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} docstring examples failed (run `python -m doctest -v`)"


def test_the_examples_are_really_run():
    attempted = sum(doctest.testmod(importlib.import_module(n), report=False).attempted for n in
                    ("fingrpo.dsl", "fingrpo.answers", "fingrpo.config", "fingrpo.tracking.registry"))
    assert attempted >= 20
