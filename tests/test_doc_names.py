"""Names in the prose resolve: every dotted name in the product packages' docstrings and comments,
and in README.md and docs/*.md, names a module, function, class or attribute that exists, and every
path into the repository names a file that exists. Modules move; the prose that names them is the
part no import checks.

Read from source (ast, tokenize), never imported: no Ray, about a second.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("teacher_service", "student_trainer", "cluster")
# modules that moved or were merged away: their former names, as prose still says them
FORMER_MODULES = {"grpc_server", "grpc_ingress", "grpc_client", "cli_cache", "teacher_client", "transform", "views",
                  "datasets"}
# module names that prose also uses for config sections, variables and libraries (`model.name`,
# `teacher.mode`, `selection.k`, `serve.delete`, `grpc.health.v1`): a `name.x` starting with one is not checked
AMBIGUOUS = {"model", "data", "teacher", "optim", "serve", "grpc", "client", "args", "config", "selection"}

QUALIFIED = re.compile(r"(?<![\w/.-])((?:%s)(?:\.[A-Za-z_]\w*)+)" % "|".join(PACKAGES))
BACKTICKED = re.compile(r"`+([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\([^`]*\))?`+")
PATH = re.compile(r"(?<![\w/.-])((?:%s|docs|tests)/[\w./-]*\w)(?:::(\w+))?" % "|".join(PACKAGES))
FILE_SUFFIX = re.compile(r"\.(md|py|yaml|yml|json|txt|toml|proto|png|csv|tar|parquet)$")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _bound_names(tree: ast.Module) -> tuple[set[str], dict[str, set[str]]]:
    """A module's top-level names (conditional ones included) and each class's attributes."""
    names, classes = set(), {}
    for node in tree.body:
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(inner.name)
            elif isinstance(inner, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in inner.names)
            elif isinstance(inner, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = inner.targets if isinstance(inner, ast.Assign) else [inner.target]
                names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        if isinstance(node, ast.ClassDef):
            classes[node.name] = _class_attributes(node)
    return names, classes


def _class_attributes(node: ast.ClassDef) -> set[str]:
    """Methods, class-level names and what any method assigns to `self.<name>`."""
    attributes = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
            attributes.add(inner.name)
        elif isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
            attributes.add(inner.id)
        elif isinstance(inner, ast.Attribute) and isinstance(inner.ctx, ast.Store):
            attributes.add(inner.attr)
    return attributes


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if not path.name.endswith(("_pb2.py", "_pb2_grpc.py")):  # generated
                modules[_module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return modules


SOURCES = _sources()
MODULES = {name: _bound_names(tree) for name, (_, tree) in SOURCES.items()}
# strings the code uses as values (dict keys, metric names): `grpc_ingress` is a stats key too
STRINGS = {node.value for _, tree in SOURCES.values() for node in ast.walk(tree)
           if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier()}
BY_LAST_PART: dict[str, list[str]] = {}
for _name in MODULES:
    BY_LAST_PART.setdefault(_name.rsplit(".", 1)[-1], []).append(_name)


def resolves(dotted: str) -> bool:
    """Whether `a.b.c` is a module, or a module's name, or a class's attribute (deeper: not checked)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module, rest = ".".join(parts[:cut]), parts[cut:]
        if module not in MODULES:
            continue
        names, classes = MODULES[module]
        folder = ROOT / module.replace(".", "/")
        if not rest:
            return True
        if rest[0] not in names:  # a data file or folder of a package (teacher.proto, configs/)
            return (folder / rest[0]).is_dir() or any(folder.glob(rest[0] + ".*"))
        return len(rest) == 1 or rest[0] not in classes or rest[1] in classes[rest[0]]
    return False


def _prose() -> list[tuple[str, int, str]]:
    """(file, line, text) of every docstring and comment of the packages and every line of the docs."""
    found = []
    for path, tree in SOURCES.values():
        where = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False) or ""
                found += [(where, node.body[0].lineno + i, line) for i, line in enumerate(doc.splitlines())]
        for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
            if token.type == tokenize.COMMENT:
                found.append((where, token.start[0], token.string))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        where = str(path.relative_to(ROOT))
        found += [(where, i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    return found


def _dangling_names(text: str) -> list[str]:
    """The names in `text` that do not resolve: fully qualified ones, backticked `module.name`, and
    former module names (alone, unless the code also uses the word as a string)."""
    bad = [name for name in QUALIFIED.findall(text) if not FILE_SUFFIX.search(name) and not resolves(name)]
    for name in BACKTICKED.findall(text):
        first, _, rest = name.partition(".")
        if first in PACKAGES or FILE_SUFFIX.search(name):
            continue
        if first in FORMER_MODULES and first not in BY_LAST_PART and (rest or first not in STRINGS):
            bad.append(name)
        elif rest and first in BY_LAST_PART and first not in AMBIGUOUS:
            if not any(resolves(f"{module}.{rest}") for module in BY_LAST_PART[first]):
                bad.append(name)
    return bad


def _dangling_paths(text: str) -> list[str]:
    bad = []
    for path, test in PATH.findall(text):
        target = ROOT / path
        if not (target.exists() or any(ROOT.glob(path))):
            bad.append(path)
        elif test and not re.search(rf"^(async )?def {test}\b", target.read_text(encoding="utf-8"), re.M):
            bad.append(f"{path}::{test}")
    return bad


def test_every_name_in_docstrings_comments_and_docs_exists():
    dangling = [f"{where}:{line}: {name}" for where, line, text in _prose()
                for name in _dangling_names(text) + _dangling_paths(text)]
    assert not dangling, "names of things that do not exist:\n" + "\n".join(dangling)


def test_the_check_finds_a_dangling_name():
    """The check itself: names that moved are caught, names that exist are not."""
    assert _dangling_names("the ingress (`grpc_server`, `grpc_ingress.decode_embed_request`)") == [
        "grpc_server", "grpc_ingress.decode_embed_request"]
    assert _dangling_names("see student_trainer.transform and teacher_service.views.augment_view") == [
        "student_trainer.transform", "teacher_service.views.augment_view"]
    assert _dangling_names("`losses.no_such_loss`, student_trainer.train.WorkerLoop.no_such_method") == [
        "student_trainer.train.WorkerLoop.no_such_method", "losses.no_such_loss"]
    assert _dangling_names("`codec.decode_embed_request`, teacher_service.contract.augment.augment_view, "
                           "student_trainer.train.WorkerLoop.train_epoch, `teacher.mode`, docs/cluster.md") == []
    assert _dangling_paths("teacher_service/grpc_server.py, tests/test_cache.py::test_no_such_test") == [
        "teacher_service/grpc_server.py", "tests/test_cache.py::test_no_such_test"]
