"""The layout is the architecture: library modules (ptx/*.py) never import the stages
(ptx/stages/), configs, bench or experiments; a stage imports the library and the shared
stage code; no import hides inside a function; module imports form no cycle."""
import ast
import os
import pathlib
import sys

from ptx import stages

ROOT = pathlib.Path(__file__).resolve().parent.parent
PTX = ROOT / "ptx"
OUTSIDE = ("configs", "bench", "experiments", "tests")
# Stage modules any stage may import; the dispatch table and the quickstart (which runs the
# other stages in order) import stage modules too.
SHARED_STAGE_CODE = {"ptx.stages.common", "ptx.stages.scaffold", "ptx.stages.validate"}
COMPOSITE_STAGES = {"ptx.stages", "ptx.stages.quickstart"}
# `python -m ptx.main`: flags, then the dispatch table.
ENTRY = {"ptx.main"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node, package: str) -> list[str]:
    """Absolute module names an import statement names (`from ptx import a, b` -> ptx.a, ptx.b)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
        return [f"{base}.{a.name}" if (ROOT / (f"{base}.{a.name}".replace(".", os.sep) + ".py")).exists()
                or (ROOT / f"{base}.{a.name}".replace(".", os.sep)).is_dir() else base for a in node.names]
    return []


def imports_of(path: pathlib.Path) -> tuple[set, list]:
    """(modules imported at module level, [(function, module)] imported inside functions)."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, inner = set(), []
    for node in tree.body:
        top.update(imported(node, package))
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                inner += [(fn.name, m) for m in imported(node, package)]
    return top, inner


def modules(under: pathlib.Path = PTX) -> dict:
    return {module_name(p): p for p in sorted(under.rglob("*.py"))}


def violations(mods: dict) -> list[str]:
    out = []
    for name, path in mods.items():
        top, inner = imports_of(path)
        stage = name == "ptx.stages" or name.startswith("ptx.stages.") or name in ENTRY
        for m in top:
            root = m.split(".")[0]
            if not stage and (root in OUTSIDE or m == "ptx.stages" or m.startswith("ptx.stages.")):
                out.append(f"library module {name} imports {m}")
            if (stage and name not in COMPOSITE_STAGES and m.startswith("ptx.stages.")
                    and m not in SHARED_STAGE_CODE):
                out.append(f"stage {name} imports another stage {m}")
        for fn, m in inner:
            if m.split(".")[0] in ("ptx",) + OUTSIDE:
                out.append(f"{name} imports {m} inside {fn}()")
    return out


def cycles(mods: dict) -> list[list[str]]:
    graph = {name: {m for m in imports_of(path)[0] if m in mods} for name, path in mods.items()}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_library_never_imports_stages_configs_or_bench_and_no_import_hides_in_a_function():
    assert violations(modules()) == []


def test_module_imports_form_no_cycle():
    assert cycles(modules()) == []


def test_every_stage_module_is_in_the_dispatch_table_or_shared():
    runners = {f.__module__ for f in stages.RUNNERS.values()}
    stage_modules = {n for n in modules(PTX / "stages") if n != "ptx.stages"}
    assert stage_modules == runners | SHARED_STAGE_CODE


def test_the_checks_catch_what_the_old_tree_did(tmp_path, monkeypatch):
    # A library module importing a stage inside a function (as checkpoint.py imported lora and
    # train.py imported world) and two modules importing each other (pipeline <-> stages).
    (tmp_path / "ptx" / "stages").mkdir(parents=True)
    (tmp_path / "ptx" / "__init__.py").write_text("")
    (tmp_path / "ptx" / "stages" / "__init__.py").write_text("from ptx.stages import loop\n")
    (tmp_path / "ptx" / "stages" / "loop.py").write_text("from ptx import lib\n")
    (tmp_path / "ptx" / "lib.py").write_text("import configs\n\ndef f():\n    from ptx import other\n")
    (tmp_path / "ptx" / "other.py").write_text("from ptx import pipe\n")
    (tmp_path / "ptx" / "pipe.py").write_text("from ptx import other\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = modules(tmp_path / "ptx")
    assert sorted(violations(mods)) == ["library module ptx.lib imports configs", "ptx.lib imports ptx.other inside f()"]
    assert cycles(mods) == [["ptx.other", "ptx.pipe", "ptx.other"]]


def test_no_catch_all_module():
    assert not list(PTX.rglob("utils.py"))
