"""The modules stay in layers: every project import at module level, the import graph a DAG,
families.py at the bottom. Parsed with `ast`, nothing imported."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ppsd_ray", "actors")


def module_files() -> dict[str, Path]:
    """Module name -> file, for every module of the project's packages (a package as its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = module_files()


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The project modules an import statement in `module` names (the closest module for a name
    imported from one: `from .config import X` -> ppsd_ray.config)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            is_package = MODULES.get(module, Path()).name == "__init__.py"
            here = module.split(".") if is_package else module.split(".")[:-1]
            here = here[:len(here) - (node.level - 1)]
            base = ".".join(here + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return sorted(out)


def imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, [(line, module)] imported inside a function or class)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    top, nested = set(), []

    def visit(node, inside: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in imported(module, child):
                    if inside:
                        nested.append((child.lineno, name))
                    elif name != module:
                        top.add(name)
            visit(child, inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                      ast.Lambda)))

    visit(tree, False)
    return top, nested


GRAPH = {m: imports(m)[0] for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_packages_are_found():
    assert {"ppsd_ray", "ppsd_ray.config", "ppsd_ray.plan", "ppsd_ray.families", "actors.pipeline"} <= MODULES.keys()
    assert "ppsd_ray.families" in GRAPH["ppsd_ray.config"] and "ppsd_ray.plan" in GRAPH["actors.pipeline"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_project_import_inside_a_function(module):
    """A function-level import of a project module is how a cycle hides; heavy optional
    third-party packages (matplotlib, ...) may still be imported lazily."""
    _, nested = imports(module)
    assert not nested, f"{MODULES[module].relative_to(ROOT)}: project imports inside a function or class: {nested}"


def test_module_imports_have_no_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_families_imports_nothing_of_the_project():
    top, nested = imports("ppsd_ray.families")
    assert not top and not nested


def test_config_does_not_plan():
    """Configuration is validated data: it neither measures nor plans."""
    def below(module, seen=None):
        seen = set() if seen is None else seen
        for m in GRAPH[module] - seen:
            seen.add(m)
            below(m, seen)
        return seen

    assert not {"ppsd_ray.plan", "ppsd_ray.calibrate", "ppsd_ray.distill"} & below("ppsd_ray.config")


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("from .config import PipelineConfig\nfrom . import distill, report\nimport actors.pipeline\n"
                     "from ppsd_ray import GenerationConfig")
    got = [imported("ppsd_ray.cli", node) for node in tree.body]
    assert got == [["ppsd_ray.config"], ["ppsd_ray.distill", "ppsd_ray.report"], ["actors.pipeline"], ["ppsd_ray"]]
