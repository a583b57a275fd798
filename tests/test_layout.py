"""The library and the lab apart: no library file imports the lab (studies/), at module or function level,
and the library's imports form no cycle, so every file reads top to bottom from what it builds on."""
import ast

from conftest import ROOT

LIBRARY = sorted([p for p in ROOT.glob('*.py')] + [p for p in (ROOT / 'data').rglob('*.py')])


def module_name(path):
    return '.'.join(path.relative_to(ROOT).with_suffix('').parts)


def imports(path):
    """Every module path imports, at any depth of the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f'{node.module}.{a.name}' for a in node.names}
    return found


def test_no_library_file_imports_the_lab():
    offenders = {module_name(p): sorted(m for m in imports(p) if m.split('.')[0] == 'studies') for p in LIBRARY}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_library_imports_form_no_cycle():
    names = {module_name(p) for p in LIBRARY}
    graph = {module_name(p): {m for m in imports(p) if m in names and m != module_name(p)} for p in LIBRARY}
    state = {}

    def visit(node, path):
        state[node] = 'open'
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 'open', 'import cycle: ' + ' -> '.join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 'done'
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_budget_is_a_leaf_of_the_loop():
    """budget.py charges and schedules; it imports no loop, model, run folder or method."""
    assert not {m.split('.')[0] for m in imports(ROOT / 'budget.py')} & {'train', 'runs', 'model', 'rho', 'slm', 'madpo',
                                                                         'calibrate', 'arch', 'loss'}


def test_importing_the_library_loads_nothing_from_the_lab():
    import subprocess
    import sys
    code = "import sys, train, rho, slm, madpo, budget, calibrate; sys.exit(any(m.startswith('studies') for m in sys.modules))"
    assert subprocess.run([sys.executable, '-c', code], cwd=ROOT).returncode == 0
