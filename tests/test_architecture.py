"""The import graph of ``slimsearch/`` against the layers ``ARCHITECTURE.md`` writes down: no
cycles between modules, no import up the layers, every module placed. Imports inside functions
count: they are dependencies too, only later ones."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "slimsearch"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The slimsearch modules ``name`` imports (``from pkg import submodule`` counts as the
    submodule, ``from module import thing`` as the module), and the packages whose
    ``__init__`` that runs first (those ``name`` itself lies in aside: they are running)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for target in list(found):
        parts = target.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))} - own - {name}
    return found


def layers() -> dict[str, int]:
    """Module prefix -> layer number, from the table in ARCHITECTURE.md."""
    table = {}
    for line in (REPO / "ARCHITECTURE.md").read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for prefix in re.findall(r"`([\w.]+)`", row.group(2)):
                table[prefix] = int(row.group(1))
    return table


def layer_of(module: str, table: dict[str, int]) -> int | None:
    """The layer of the longest prefix of ``module`` that the table names (the package's own
    ``__init__``, ``slimsearch``, is only itself)."""
    candidates = [p for p in table
                  if module == p or (module.startswith(p + ".") and p != "slimsearch")]
    return table[max(candidates, key=len)] if candidates else None


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_every_module_is_placed_in_a_layer() -> None:
    table = layers()
    assert len(set(table.values())) >= 8, "ARCHITECTURE.md's layer table was not found"
    assert not [m for m in GRAPH if layer_of(m, table) is None], \
        "these modules are in no layer of ARCHITECTURE.md"


def test_no_import_goes_up_the_layers() -> None:
    table = layers()
    upward = [f"{m} (layer {layer_of(m, table)}) imports {d} (layer {layer_of(d, table)})"
              for m, deps in GRAPH.items() for d in sorted(deps)
              if (layer_of(d, table) or 0) > (layer_of(m, table) or 0)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    cycles = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dependency in sorted(GRAPH[module]):
            if state.get(dependency) == "open":
                cycles.append(" -> ".join(stack[stack.index(dependency):] + [dependency]))
            elif dependency not in state:
                visit(dependency)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(cycles)


#: Layers that know no search engine: only slimsearch.search imports optuna and ray (the run
#: folder and the report read the study through Optuna's storage, above these).
ENGINE_FREE = ("slimsearch.compression", "slimsearch.runtimes", "slimsearch.evaluators",
               "slimsearch.spaces", "slimsearch.tasks", "slimsearch.timing", "slimsearch.training")


def test_no_engine_below_the_search() -> None:
    engines = []
    for name, path in modules().items():
        if not name.startswith(ENGINE_FREE):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            engines += [f"{name} imports {n}" for n in names
                        if n.split(".")[0] in ("optuna", "ray")]
    assert not engines, "\n".join(engines)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks above would pass on any graph if ``imports`` found nothing."""
    assert "slimsearch.runtimes.int8" in GRAPH["slimsearch.runtimes.loading"]
    assert "slimsearch.timing.latency" in GRAPH["slimsearch.runtimes.int8"]
    assert "slimsearch.search.ray_searcher" in GRAPH["slimsearch.search.ray_backend"]  # lazy
    table = layers()
    assert layer_of("slimsearch.search.lifecycle", table) > layer_of("slimsearch.run.folder",
                                                                      table)
    known = {"slimsearch.a": tmp_path / "a.py", "slimsearch.b": tmp_path / "b.py"}
    known["slimsearch.a"].write_text("from slimsearch.b import thing\n")
    known["slimsearch.b"].write_text("def f():\n    import slimsearch.a\n")
    assert imports("slimsearch.a", known["slimsearch.a"], known) == {"slimsearch.b"}
    assert imports("slimsearch.b", known["slimsearch.b"], known) == {"slimsearch.a"}
    # importing q.c runs q/__init__ first: a cycle through it counts
    known.update({"slimsearch.q": tmp_path / "q.py", "slimsearch.q.c": tmp_path / "c.py"})
    known["slimsearch.q.c"].write_text("")
    (tmp_path / "qa.py").write_text("import slimsearch.q.c\n")
    assert imports("slimsearch.a", tmp_path / "qa.py", known) == {"slimsearch.q",
                                                                  "slimsearch.q.c"}
    assert layer_of("slimsearch.brand_new", table) is None  # placed by no prefix


#: Longer functions hide several steps in one; split them into named steps instead.
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {node.end_lineno - start + 1} lines")
    assert not long, long


def test_no_class_is_defined_inside_a_function() -> None:
    inner = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inner += [f"{name}.{node.name}: class {c.name}" for c in ast.walk(node)
                          if isinstance(c, ast.ClassDef)]
    assert not inner, inner
