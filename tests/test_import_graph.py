"""The attack side does not import the defense side.

The pipeline runs one way (data → attack → model → defense → evaluate → report): a module
that trains or poisons a model must work, and be read, without the defenses. Checked on the
static import graph of the package's own modules (every `import` and `from … import`, package
`__init__` files included), leaving out the top-level `tscpurify/__init__.py`, whose
convenience re-exports run for any submodule import and are the user's entry point, not a
dependency of the pipeline.
"""

import ast
from pathlib import Path

import tscpurify

PACKAGE = Path(tscpurify.__file__).parent
ATTACK_SIDE = ("tscpurify.attacks", "tscpurify.data", "tscpurify.models", "tscpurify.ssl",
               "tscpurify.runs", "tscpurify.training", "tscpurify.evaluation",
               "tscpurify.retune", "tscpurify.checkpoint")
DEFENSE_SIDE = ("tscpurify.defenses", "tscpurify.bench", "tscpurify.purification")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports (a.b.c also imports a.b's __init__)."""
    names = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    module = base + (node.module.split(".") if node.module else [])
                else:
                    module = (node.module or "").split(".")
                targets.add(".".join(module))
                targets |= {".".join(module + [alias.name]) for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        edges = set()
        for target in targets:
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)
                      if ".".join(parts[:i]) in names}
        graph[name] = edges - {name, "tscpurify"}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not, each with the module that imports it."""
    via, stack = {start: ""}, [start]
    while stack:
        current = stack.pop()
        for target in graph.get(current, ()):
            if target not in via:
                via[target] = current
                stack.append(target)
    return via


def test_the_attack_side_never_imports_the_defense_side():
    graph = import_graph()
    assert "tscpurify.defenses.tsc" in graph and "tscpurify.runs" in graph  # the graph is real
    for start in ATTACK_SIDE:
        via = reachable(graph, start)
        for module in via:
            if module.startswith(DEFENSE_SIDE):
                chain = [module]
                while via[chain[-1]]:
                    chain.append(via[chain[-1]])
                raise AssertionError(f"{start} imports the defense side: "
                                     f"{' <- '.join(chain)}")


def test_the_graph_sees_relative_and_package_imports():
    graph = import_graph()
    assert "tscpurify.defenses.tsc" in reachable(graph, "tscpurify.purification")
    assert "tscpurify.ssl.clip" in graph["tscpurify.defenses.tsc_clip"]
