"""The layout the README's "Layout" section describes: what each folder of vit/ may import, no import
cycle anywhere in vit/, jobs/ and hydra_plugins/, and no function too long to read in one screen.
Read from the source (every import, including those inside functions), not from what happens to be
imported at run time."""
import ast
from collections import defaultdict
from pathlib import Path

from helpers import ROOT

# Each part of vit/ and the parts it may import (README, Layout). The shared contracts on top
# (errors, run_dir, journal, stop) import only each other.
MAY_IMPORT = {
    "errors": set(),
    "run_dir": set(),
    "stop": set(),
    "journal": {"run_dir"},
    "models": {"errors"},
    "data": {"errors", "stop"},
    "config": {"errors", "models", "data", "tasks"},
    "engine": {"errors", "run_dir", "journal", "stop", "config", "models", "data"},
    "engine.train": {"errors", "run_dir", "journal", "stop", "config", "models", "data", "tasks", "engine"},
    "tasks": {"errors", "run_dir", "models", "data", "engine"},
    "cluster": {"errors", "run_dir", "journal", "stop", "config", "models", "data", "tasks", "engine"},
}
MAX_FUNCTION_LINES = 100  # the training loop, top to bottom, is the longest


def modules() -> dict[str, Path]:
    files = [*(ROOT / "vit").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    named = {".".join(f.relative_to(ROOT).with_suffix("").parts): f for f in files}
    return {name.removesuffix(".__init__"): f for name, f in named.items()}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph = defaultdict(set)
    for name, path in found.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for target in targets:
                while target and target not in found:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def part_of(module: str) -> str:
    """vit.engine.train -> engine.train (its own rule); vit.engine.optim -> engine; vit.errors -> errors."""
    rest = module.split(".")[1:] or ["__init__"]
    return "engine.train" if rest[:2] == ["engine", "train"] else rest[0]


def test_there_is_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(modules()):
        if module not in state:
            visit(module, [module])


def test_each_part_of_vit_imports_only_the_parts_below_it():
    wrong = []
    for module, deps in import_graph().items():
        if not module.startswith("vit.") or part_of(module) not in MAY_IMPORT:
            continue
        src = part_of(module)
        for dep in deps:
            if dep.startswith(("jobs", "hydra_plugins")):
                wrong.append(f"{module} imports {dep}")
            elif dep.startswith("vit.") and (dst := part_of(dep).split(".")[0]) != src.split(".")[0]:
                if dst not in MAY_IMPORT[src]:
                    wrong.append(f"{module} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_of_vit_belongs_to_a_part_with_a_rule():
    parts = {part_of(m) for m in modules() if m.startswith("vit.")} - {"__init__"}
    assert parts <= set(MAY_IMPORT), parts - set(MAY_IMPORT)


def test_no_function_in_vit_is_longer_than_a_screen_or_two():
    long = []
    for path in (ROOT / "vit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
