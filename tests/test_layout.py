"""The architecture holds: imports flow one way through library/'s stages, no script imports
another script, and no handler catches every exception (a bug must show as one)."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"prepare_features", "train_pfg", "gen_pfg", "eval_pfg"}
# Each stage may import its own and the lower ones; prepare and sample are peers.
LAYERS = {
    "shared": 0,  # library/errors.py, fileio.py, cli_config.py, metadata.py, ...: beside everything
    "data": 1,
    "models": 2,
    "prepare": 3,
    "sample": 3,
    "evaluation": 4,
    "train": 5,
}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "shared"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)]
            if node.module == "library":  # from library import quiet
                found += [(node.lineno, f"library.{alias.name}") for alias in node.names]
    return found


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_library_imports_flow_one_way():
    wrong = []
    for path in _python_files("library"):
        here = _module_name(path)
        stage = _stage(here)
        for line, module in _imports(path):
            if module.split(".")[0] in SCRIPTS:
                wrong.append(f"{path.relative_to(REPO)}:{line} imports the script {module}")
            if not module.startswith("library."):
                continue
            other = _stage(module)
            if other == stage:
                continue
            if LAYERS[other] >= LAYERS[stage]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({stage}) imports {module} ({other})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_layering_check_sees_a_wrong_import(tmp_path):
    """The check above would fail on a data module importing the trainer, or on a script import."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from library.train.trainer import PFGTrainer\n    import prepare_features\n")
    modules = [m for _, m in _imports(probe)]
    assert modules == ["library.train.trainer", "prepare_features"]
    assert LAYERS[_stage("library.train.trainer")] > LAYERS[_stage("library.data.dataset")]
    assert _stage("library.errors") == "shared" and _stage("library.models.families.sdxl") == "models"


def test_scripts_do_not_import_each_other():
    wrong = [f"{path.name}:{line} imports {module}" for path in (REPO / f"{s}.py" for s in SCRIPTS)
             for line, module in _imports(path) if module.split(".")[0] in SCRIPTS]
    assert not wrong, wrong


def _broad_handlers(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ExceptHandler):
            continue
        names = []
        if node.type is None:
            names = ["(bare except)"]
        else:
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = [t.id for t in types if isinstance(t, ast.Name) and t.id in ("Exception", "BaseException")]
        where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
        found += [f"{where}:{node.lineno} catches {n}" for n in names]
    return found


def test_no_handler_catches_every_exception():
    """A broad except turns a bug into a user message ("the hub cannot be reached"): each handler
    names the errors its call raises."""
    files = _python_files("library") + [REPO / f"{s}.py" for s in SCRIPTS]
    broad = [line for path in files for line in _broad_handlers(path)]
    assert not broad, broad


def test_the_broad_handler_check_sees_one(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("try:\n    pass\nexcept (OSError, Exception):\n    pass\ntry:\n    pass\nexcept:\n    pass\n")
    assert len(_broad_handlers(probe)) == 2
