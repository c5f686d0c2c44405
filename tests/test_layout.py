"""The layout is the architecture: library modules (ptx/*.py) never import the stages
(ptx/stages/), configs, bench or experiments; a stage imports the library and the shared
stage code; no import hides inside a function; module imports form no cycle; every library
module with behaviour has its test file, tests/test_<module>.py; a training method's name is
tested only in the method table; only steps.setup builds a trainer; every config field is
declared once, in its section's dataclass."""
import ast
import collections
import dataclasses
import os
import pathlib
import sys

from ptx import methods, stages
from ptx.stages import validate

ROOT = pathlib.Path(__file__).resolve().parent.parent
PTX = ROOT / "ptx"
OUTSIDE = ("configs", "bench", "experiments", "tests")
# Stage modules any stage may import; the dispatch table and the quickstart (which runs the
# other stages in order) import stage modules too.
SHARED_STAGE_CODE = {"ptx.stages.common", "ptx.stages.scaffold", "ptx.stages.validate"}
# The loop map (method row -> loop) and the modules that run other stages import loops.
COMPOSITE_STAGES = {"ptx.stages", "ptx.stages.quickstart", "ptx.stages.loops"}
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
    assert stage_modules == runners | SHARED_STAGE_CODE | {"ptx.stages.loops"}


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


# --------------------------------------------------------------- the method table, one trainer, one declaration

METHOD_NAMES = {m.name for m in methods.METHODS}
# Modules that may name methods: the table itself, and the quickstart, whose sub-stage names
# (configs/quickstart.py's sections: pretrain, sft, judge, ...) are its recipe, not dispatch.
NAMES_METHODS = {"ptx.methods", "ptx.stages.quickstart"}


def _names_stage(node) -> bool:
    return any(isinstance(n, ast.Name) and "stage" in n.id or isinstance(n, ast.Attribute) and "stage" in n.attr
               for n in ast.walk(node))


def _method_strings(node) -> set:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in METHOD_NAMES}


def stage_name_tests(mods: dict) -> list[str]:
    """Places outside the method table that test a training method's name: a comparison of
    something named *stage* with one, or a dict literal keyed by two or more of them."""
    out = []
    for name, path in mods.items():
        if name in NAMES_METHODS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and _names_stage(node):
                hits = set().union(*(_method_strings(c) for c in [node.left, *node.comparators]))
                if hits:
                    out.append(f"{name}:{node.lineno} tests the stage against {sorted(hits)}")
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in METHOD_NAMES}
                if len(keys) >= 2:
                    out.append(f"{name}:{node.lineno} a table keyed by methods {sorted(keys)}")
    return out


# What only `steps.setup` does: lay out a train state and jit its steps.
TRAINER_PIECES = ("init_state", "compile_step", "train_step", "eval_step")


def trainers_built(paths: dict) -> list[str]:
    """Places outside ptx/steps.py that build a trainer themselves (call `steps.<one of TRAINER_PIECES>`;
    a `steps.setup` trainer's own `.train_step` is what a loop calls)."""
    out = []
    for name, path in paths.items():
        if name == "ptx.steps":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "steps"
                    and node.func.attr in TRAINER_PIECES):
                out.append(f"{name}:{node.lineno} calls {node.func.attr}")
    return out


def typed_sections() -> dict:
    """Config section name -> the frozen dataclasses that declare it (`reward`: two, by stage)."""
    out = collections.defaultdict(set)
    for section, cls in (validate.SECTIONS | validate.TRAINED | validate.SAMPLING).items():
        out[section].add(cls)
    for m in methods.METHODS:
        for section, cls in m.sections:
            out[section].add(cls)
    return out


def _section_field(target):
    """('rl', 'kl_coef') of an assignment target `c.rl.kl_coef` (any name for `c`), else None."""
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute):
        return target.value.attr, target.attr
    return None


def declared_twice(config_files: list, sections: dict) -> list[str]:
    """Config fields declared in configs/ as well as in their dataclass: a typed section built as
    a ConfigDict by hand, or, in the file that builds a section, a field set to its dataclass
    default (a second declaration; a file that inherits the section may set a default back)."""
    out = []
    for path in config_files:
        assigns = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Assign)]
        built = {t.attr for n in assigns for t in n.targets if isinstance(t, ast.Attribute)
                 and t.attr in sections and isinstance(n.value, ast.Call)}
        for node in assigns:
            for target in node.targets:
                if (isinstance(target, ast.Attribute) and target.attr in sections and isinstance(node.value, ast.Call)
                        and getattr(node.value.func, "attr", getattr(node.value.func, "id", "")) == "ConfigDict"):
                    out.append(f"{path.name}:{node.lineno} builds section {target.attr!r} by hand")
                pair = _section_field(target)
                if pair is None or pair[0] not in built or not isinstance(node.value, ast.Constant):
                    continue
                defaults = [f.default for cls in sections[pair[0]] for f in dataclasses.fields(cls)
                            if f.name == pair[1]]
                if defaults and all(d == node.value.value and type(d) is type(node.value.value) for d in defaults):
                    out.append(f"{path.name}:{node.lineno} declares {pair[0]}.{pair[1]} again (its default)")
    return out


def test_no_stage_name_is_tested_outside_the_method_table():
    assert stage_name_tests(modules()) == []


def test_only_steps_setup_builds_a_trainer():
    paths = modules() | {module_name(p): p for p in sorted((ROOT / "bench").glob("*.py"))}
    assert trainers_built(paths) == []


def test_every_config_field_is_declared_once():
    assert declared_twice(sorted((ROOT / "configs").glob("*.py")), typed_sections()) == []


def test_the_three_checks_catch_what_the_old_tree_did(tmp_path, monkeypatch):
    # As the old tree was: the supervised loop tested config.stage, validate kept per-stage
    # tables, each loop built its trainer, configs/ppo.py declared the rl section by hand.
    (tmp_path / "ptx" / "stages").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "ptx" / "stages" / "supervised.py").write_text(
        "def encode(config):\n    return config.stage in ('dpo', 'reward', 'orpo')\n"
        "def run(config, steps):\n    if config.stage == 'reward':\n        pass\n"
        "    state = steps.init_state(params, tx)\n    step = steps.compile_step(fn)\n")
    (tmp_path / "ptx" / "stages" / "validate.py").write_text("KINDS = {'sft': ('sft',), 'dpo': ('preference',)}\n")
    (tmp_path / "configs" / "ppo.py").write_text(
        "def get_config(c):\n    c.rl = common.ml_collections.ConfigDict()\n    c.rl.rollout_batch = 64\n"
        "    c.rl.kl_coef = 0.1\n    c.data.kind = 'sft'\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = modules(tmp_path / "ptx")
    assert stage_name_tests(mods) == [
        "ptx.stages.supervised:2 tests the stage against ['dpo', 'orpo', 'reward']",
        "ptx.stages.supervised:4 tests the stage against ['reward']",
        "ptx.stages.validate:1 a table keyed by methods ['dpo', 'sft']"]
    assert trainers_built(mods) == ["ptx.stages.supervised:6 calls init_state",
                                    "ptx.stages.supervised:7 calls compile_step"]
    assert declared_twice([tmp_path / "configs" / "ppo.py"], typed_sections()) == [
        "ppo.py:2 builds section 'rl' by hand", "ppo.py:3 declares rl.rollout_batch again (its default)"]
