"""The package layout follows the data's way (issue 18): each stage imports only the stages below it, and no
module imports another that imports it back, directly or through others.

``cli`` -> ``serving`` -> ``runtime`` -> ``quant`` / ``hub`` -> ``checkpoint`` -> ``files`` -> ground
(``errors``, ``constants``, ``units``, ``progress``). ``gptq_tools/__init__.py`` (the public API) and
``__main__.py`` sit above everything: they may import any stage. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gptq_tools"
#: Rank of each stage: a module may import its own stage and lower ranks only.
STAGES = {"ground": 0, "files": 1, "checkpoint": 2, "hub": 3, "quant": 3, "runtime": 4, "serving": 5, "cli": 6,
          "api": 7}
#: Stages of one rank that must not import each other (quantizing needs no Hub, downloading no quantizer).
SIBLINGS_APART = {("hub", "quant"), ("quant", "hub")}
GROUND = {"errors", "constants", "units", "progress"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "api"
    if parts[1] in GROUND:
        return "ground"
    return parts[1]


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """Every gptq_tools module ``path`` imports (absolute names; ``from X import y`` counts X.y when it is a
    module, and X itself when some name is not)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "gptq_tools"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gptq_tools":
                continue
            named = {f"{target}.{alias.name}" for alias in node.names}
            found |= named & modules
            if named - modules:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {target for target in imports_of(path, name, set(modules)) if target in modules and target != name}
            for name, path in modules.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = stage_of(source), stage_of(target)
            if STAGES[b] > STAGES[a] or (a, b) in SIBLINGS_APART:
                bad.append(f"{source} ({a}) imports {target} ({b})")
    return sorted(bad)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), ignoring a package's import of its own
    submodules' parents (``from . import x`` in ``pkg/__init__`` is the package assembling itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if node.startswith(nxt + "."):  # a submodule naming its own package: not a dependency on itself
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_stage() -> None:
    assert {stage_of(name) for name in graph()} <= set(STAGES)


def test_top_level_holds_the_stages_and_at_most_six_modules() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "constants.py", "errors.py", "progress.py", "units.py"]
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["checkpoint", "cli", "files", "hub", "quant", "runtime", "serving"]


def test_stages_import_only_downward() -> None:
    assert upward_imports(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_checks_catch_a_bad_import() -> None:
    """The two checks themselves: an upward import and a cycle, planted in a copy of the graph, are found."""
    edges = {name: set(targets) for name, targets in graph().items()}
    edges["gptq_tools.files.join"].add("gptq_tools.runtime.load")
    assert upward_imports(edges) == ["gptq_tools.files.join (files) imports gptq_tools.runtime.load (runtime)"]
    edges["gptq_tools.files.split"].add("gptq_tools.files.parts")
    edges["gptq_tools.files.parts"].add("gptq_tools.files.split")
    assert ["gptq_tools.files.parts", "gptq_tools.files.split"] in cycles(edges)


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
def test_each_stage_says_what_it_holds_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text(encoding="utf-8")))
    assert doc and "imports" in doc.splitlines()[0] + " ".join(doc.splitlines()[1:3])
