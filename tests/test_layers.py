"""The package's modules import each other without a cycle (function-level imports count; imports
under ``if TYPE_CHECKING:`` do not), and neither the engine nor any component imports the
reporting layer (figures are drawn from the run's events, ``cilearn.events``)."""
import ast
import re
from pathlib import Path

import cilearn

PKG = Path(cilearn.__file__).parent
REPORTING = {"cilearn.report", "cilearn.report.live", "cilearn.report.figures", "cilearn.report.pictures",
             "cilearn.report.html", "cilearn.report.summaries", "cilearn.results", "cilearn.tblog", "cilearn.api", "cilearn.cli"}
TOP = REPORTING | {"cilearn", "cilearn.__main__"}   # the package (its API) and `python -m cilearn`


def module_name(path: Path) -> str:
    parts = ["cilearn", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at run time), parents of a package excluded."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for b in n.body for x in ast.walk(b)}
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for n in ast.walk(tree):
            if id(n) in typing_only:
                continue
            if isinstance(n, ast.ImportFrom) and n.module != "__future__":
                base = ".".join(here[: len(here) - n.level + 1] + ([n.module] if n.module else [])) if n.level else n.module
                names = [base] + [f"{base}.{a.name}" for a in n.names]
            elif isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            else:
                continue
            deps |= {t for t in names if t in files and t != mod and not t.startswith(mod + ".")}
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}            # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(imports())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_top_layers_import_reporting():
    graph = imports()
    for mod, deps in graph.items():
        if mod not in TOP:
            assert not deps & REPORTING, f"{mod} imports {sorted(deps & REPORTING)}"


PAPERS = ("icarl", "lucir", "podnet", "foster", "der", "wa", "bic", "lwf", "lwm", "dfgr", "dt-id", "dtid",
          "mnemonics", "cim", "bsce", "ewc")


def test_the_contract_and_the_runner_name_no_paper():
    for name in ("components.py", "runner.py"):
        text = (PKG / name).read_text().lower()
        found = [p for p in PAPERS if re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text)]
        assert not found, f"{name} names {found}"


def test_no_deferred_import_of_the_package():
    """Imports of the package's own modules are at module level (function-level imports are kept for
    optional heavy dependencies: matplotlib, tensorboard, ...)."""
    deferred = []
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                       for b in n.body for x in ast.walk(b)}
        for n in ast.walk(tree):
            internal = (isinstance(n, ast.ImportFrom) and (n.level > 0 or (n.module or "").startswith("cilearn"))) or \
                (isinstance(n, ast.Import) and any(a.name.startswith("cilearn") for a in n.names))
            if internal and id(n) not in top and id(n) not in typing_only:
                deferred.append(f"{path.relative_to(PKG)}:{n.lineno}")
    assert not deferred, deferred


def test_the_live_observer_and_the_results_figures_are_apart():
    """``cilearn.report``: the live observer (models, data) and the results -> figures/HTML half
    (metrics.json alone) import only the drawing modules below them, not each other."""
    graph = imports()
    live, results_half = {"cilearn.report.live"}, {"cilearn.report.html", "cilearn.report.summaries",
                                                   "cilearn.report.figures"}
    for mod in live:
        assert not graph[mod] & results_half - {"cilearn.report.figures"}, f"{mod} imports {sorted(graph[mod])}"
    for mod in results_half | {"cilearn.report.pictures"}:
        assert not graph[mod] & live, f"{mod} imports the live observer"
        assert "cilearn.models.net" not in graph[mod] and "cilearn.attention" not in graph[mod], mod
