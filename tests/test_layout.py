"""The code's shape, as README promises it: imports run one way (no cycle among the project's modules, imports inside
functions included), and the reader's path (model.py, train.py, q0.py, prior.py) stays within its line budgets with no
function over 70 lines. Reads the sources with ast: no import, milliseconds."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"model.py": 230, "train.py": 300, "q0.py": 300, "prior.py": 250}


def project_imports():
    """{module: the project's modules it imports anywhere in its source} for the top-level scripts and tools/."""
    paths = {p.relative_to(ROOT).with_suffix("").as_posix().replace("/", "."): p
             for p in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")] if p.stem != "__init__"}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def test_imports_run_one_way():
    graph, state, cycles = project_imports(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"
    assert "tools.sample" not in graph["eval"] and "eval" in graph["tools.sample"]  # tools call eval.py, not back


@pytest.mark.parametrize("name", BUDGETS)
def test_the_readers_path_within_its_budget(name):
    source = (ROOT / name).read_text()
    functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    longest = max(functions, key=lambda n: n.end_lineno - n.lineno)
    assert len(source.splitlines()) <= BUDGETS[name]
    assert longest.end_lineno - longest.lineno + 1 <= 70, f"{longest.name} is {longest.end_lineno - longest.lineno + 1} lines"
