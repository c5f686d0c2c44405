"""The layout is the architecture: library modules (ptx/*.py) never import the stages
(ptx/stages/), configs, bench or experiments; a stage imports the library and the shared
stage code; no import hides inside a function; module imports form no cycle; every library
module with behaviour has its test file, tests/test_<module>.py."""
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
TESTS = ROOT / "tests"
# Library modules that are glue, with no behaviour of their own to test: package markers and
# the package's re-exports. Every other module ptx/<name>.py has tests/test_<name>.py; the
# modules of a package (ptx/losses/*.py) share tests/test_<package>.py.
GLUE = {
    "ptx",  # ptx/__init__.py: empty
    "ptx.losses",  # ptx/losses/__init__.py: re-exports tokens, supervised and rl
}


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


def untested(mods: dict, tests: pathlib.Path) -> list[str]:
    """Library modules (not stages, not glue) without their test file."""
    out = []
    for name in sorted(mods):
        parts = name.split(".")
        if name in GLUE or name in ENTRY or "stages" in parts:
            continue
        want = tests / f"test_{parts[1]}.py"  # ptx.x -> test_x.py; ptx.losses.rl -> test_losses.py
        if not want.exists():
            out.append(f"{name} has no {want.relative_to(tests.parent)}")
    return out


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
    assert sorted(violations(mods)) == ["library module ptx.lib imports configs",
                                        "ptx.lib imports ptx.other inside f()"]
    assert cycles(mods) == [["ptx.other", "ptx.pipe", "ptx.other"]]


def test_every_library_module_with_behaviour_has_its_test_file():
    assert untested(modules(), TESTS) == []


def test_the_test_file_check_catches_a_module_without_one(tmp_path, monkeypatch):
    # As the old tree was: ptx/steps.py tested inside test_train.py, so no test_steps.py.
    (tmp_path / "ptx" / "losses").mkdir(parents=True)
    (tmp_path / "tests").mkdir()
    for f in ("__init__.py", "steps.py", "model.py", "losses/__init__.py", "losses/rl.py", "losses/tokens.py"):
        (tmp_path / "ptx" / f).write_text("")
    for f in ("test_model.py", "test_losses.py", "test_train.py"):
        (tmp_path / "tests" / f).write_text("")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert untested(modules(tmp_path / "ptx"), tmp_path / "tests") == ["ptx.steps has no tests/test_steps.py"]
    (tmp_path / "tests" / "test_losses.py").unlink()
    assert untested(modules(tmp_path / "ptx"), tmp_path / "tests") == [
        "ptx.losses.rl has no tests/test_losses.py", "ptx.losses.tokens has no tests/test_losses.py",
        "ptx.steps has no tests/test_steps.py"]


def test_no_catch_all_module():
    assert not list(PTX.rglob("utils.py"))
