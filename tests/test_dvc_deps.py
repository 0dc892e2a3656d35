"""The code a ``dvc.yaml`` stage lists is exactly the code its ``fingrpo`` sub-command imports, the
project's imports form no cycle, and no module grows past ~500 lines without a reason.

A stage's code is computed, not listed by hand: its sub-command's handler in :mod:`fingrpo.cli` calls one
stage function of :mod:`fingrpo.pipeline`; that function's imports (the stage functions import their
stage when it runs) plus ``pipeline``'s own module-level imports, followed transitively through every
import of every module reached (module level and inside functions; ``TYPE_CHECKING`` blocks are not run,
so they do not count) and through the package ``__init__`` files each import runs. The plumbing every
stage shares (``cli``, ``io``, ``errors``, the package root) is left out on both sides, as ``dvc.yaml``
says, so that editing it does not retrain.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import yaml

from fingrpo import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fingrpo"
PLUMBING = {"fingrpo/__init__.py", "fingrpo/__main__.py", "fingrpo/cli.py", "fingrpo/io.py", "fingrpo/errors.py"}

# Modules over ~500 lines, each one job that reads top to bottom (the rule; a new entry needs a reason).
LONG_MODULES = {
    "fingrpo/grpo/trainer.py": "the GRPO training loop: one step, its metrics, quick evaluation, the loop",
    "fingrpo/rewards.py": "the reward functions and their registry, each a small class",
    "fingrpo/grpo/rollout.py": "shared-prompt sampling and log-prob scoring against one KV cache",
    "fingrpo/data/tatqa.py": "the TAT-QA adapter: typed records, derivation parser, table conversion, split",
    "fingrpo/scoring.py": "the official FinQA/TAT-QA rules applied to predictions, and prediction files",
    "fingrpo/plots.py": "one function per PNG, and the stage that draws them",
    "fingrpo/dsl.py": "the FinQA program language: parser, interpreter, official tokens",
}
MAX_LINES = 500


def _module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _module_files()


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(nodes: list[ast.stmt]):
    """Every Import/ImportFrom under ``nodes`` (function bodies included), TYPE_CHECKING blocks skipped."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(getattr(node, "orelse", []))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The project modules an import statement imports (``from a import b``: ``a.b`` when it is a module)."""
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            head = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(head + ([node.module] if node.module else []))
        names = {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    found = set()
    for name in names:
        while name and name not in MODULES:  # `import fingrpo.x.y` of a name that is an attribute
            name = name.rpartition(".")[0]
        if name.startswith("fingrpo"):
            found.add(name)
    return found


def _with_packages(names: set[str]) -> set[str]:
    """Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first."""
    out = set(names)
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return out


def _imports(module: str, nodes: list[ast.stmt] | None = None) -> set[str]:
    tree = nodes if nodes is not None else ast.parse(MODULES[module].read_text(encoding="utf-8")).body
    return {t for n in _import_nodes(tree) for t in _targets(n, module)} - {module}


def _closure(start: set[str], seen: set[str] | None = None) -> set[str]:
    """``start`` and everything it imports, transitively (modules in ``seen`` count but are not expanded)."""
    seen = set(seen or ())
    todo = list(_with_packages(start))
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += sorted(_with_packages(_imports(module)) - seen)
    return seen


def _stage_function(subcommand: str) -> str:
    """The pipeline function a sub-command's handler calls (``fingrpo train`` -> ``train_stage``)."""
    handler = cli.build_parser().parse_args([subcommand]).func
    tree = ast.parse(inspect.getsource(handler))
    called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and n.value.id == "pipeline" and n.attr.endswith("_stage")}
    assert len(called) == 1, f"`fingrpo {subcommand}`: expected one pipeline.*_stage call, found {called}"
    return called.pop()


def stage_code(subcommand: str) -> set[str]:
    """Repository paths of the code `fingrpo <subcommand>` runs (plumbing left out)."""
    pipeline_tree = ast.parse(MODULES["fingrpo.pipeline"].read_text(encoding="utf-8"))
    name = _stage_function(subcommand)
    (function,) = [n for n in pipeline_tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    module_level = [n for n in pipeline_tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    start = _imports("fingrpo.pipeline", module_level) | _imports("fingrpo.pipeline", [function])
    # pipeline itself counts, but only this stage function's imports are followed (not its siblings')
    files = {MODULES[m].relative_to(ROOT).as_posix() for m in _closure(start, seen={"fingrpo.pipeline"})}
    return files - PLUMBING


def _dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


STAGES = sorted(_dvc_stages())


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_exactly_the_code_each_stage_imports(stage):
    spec = _dvc_stages()[stage]
    program, subcommand = spec["cmd"].split()[:2]
    assert program == "fingrpo", f"stage {stage}: cmd {spec['cmd']!r} is not a fingrpo sub-command"
    listed = {d for d in spec["deps"] if isinstance(d, str) and d.startswith("fingrpo/")}
    imported = stage_code(subcommand)
    missing, extra = sorted(imported - listed), sorted(listed - imported)
    assert not missing and not extra, (
        f"dvc.yaml stage {stage!r} (`{spec['cmd']}`): add to deps {missing}; remove from deps {extra}"
    )


def test_the_stage_code_computation_sees_a_removed_dependency(tmp_path):
    """The check can fail: drop one listed file of the train stage and it is reported missing."""
    spec = _dvc_stages()["train"]
    listed = {d for d in spec["deps"] if isinstance(d, str) and d.startswith("fingrpo/")}
    imported = stage_code("train")
    assert "fingrpo/grpo/attention.py" in imported and "fingrpo/grpo/checkpoint.py" in imported
    assert imported - (listed - {"fingrpo/grpo/attention.py"}) == {"fingrpo/grpo/attention.py"}
    # and a stage's code stays its own: the served model's code does not retrain
    assert "fingrpo/tracking/serving.py" not in imported and "fingrpo/tracking/registry.py" not in imported
    assert "fingrpo/tracking/serving.py" in stage_code("register")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_fingrpo_modules():
    # every import, at module level or inside a function (a cycle hidden in a function is still a cycle)
    graph = {m: _imports(m) for m in MODULES}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the walk finds one


def test_project_imports_sit_at_the_top_except_in_the_stage_functions():
    """Only :mod:`fingrpo.pipeline`'s stage functions import project code inside a function (and the
    lazy package facades, which use importlib)."""
    inside = []
    for module, path in MODULES.items():
        if module == "fingrpo.pipeline":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            inside += [f"{module}.{fn.name}" for n in _import_nodes(fn.body) if _targets(n, module)]
    assert inside == []


def test_no_module_is_over_500_lines_without_a_reason():
    long = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in MODULES.values()}
    over = {p: n for p, n in long.items() if n > MAX_LINES}
    assert set(over) <= set(LONG_MODULES), f"over {MAX_LINES} lines without a reason in LONG_MODULES: {over}"
    assert all(long.get(p, 0) > MAX_LINES for p in LONG_MODULES), "LONG_MODULES lists a module that is short now"


def test_the_base_stage_paths_in_dvc_yaml_are_where_evaluate_looks():
    from fingrpo.config import load_config
    from fingrpo.evaluate import base_cache_paths

    stages = _dvc_stages()
    paths = [str(p) for p in base_cache_paths(load_config(ROOT / "params.yaml"))]
    assert stages["evaluate_base"]["outs"] == paths
    assert set(paths) <= set(stages["evaluate"]["deps"])
