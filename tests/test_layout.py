"""The layout's promises (issue 8), checked on the source: the loss library never imports
the training app, the app uses no private name of the library, functions stay short."""
import ast
import os

import pytest

from tests.util import ROOT

PKG = os.path.join(ROOT, "minorsft")
MAX_FUNCTION_LINES = 80
# The thin layers above both: they may import the training app.
APP = ("train", "cli.py", "demo.py", "__main__.py")


def _modules(top):
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield os.path.relpath(path, top), ast.parse(open(path, encoding="utf-8").read())


def _imports(tree):
    """``(module, names)`` of every import statement, absolute module paths."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]


@pytest.mark.parametrize("top", ["minorsft", "kernels"])   # kernels/ is minorsft.kernels
def test_library_never_imports_the_training_app(top):
    for rel, tree in _modules(os.path.join(ROOT, top)):
        if top == "minorsft" and rel.startswith(APP):
            continue
        for module, _ in _imports(tree):
            assert not module.startswith(("minorsft.train", "minorsft.demo", "minorsft.cli")), \
                f"{top}/{rel} imports {module}"


def test_training_app_uses_no_private_name_of_the_library():
    for rel, tree in _modules(os.path.join(PKG, "train")):
        for module, names in _imports(tree):
            if module.startswith("minorsft") and not module.startswith("minorsft.train"):
                private = [n for n in [module.rsplit(".", 1)[-1], *names] if n.startswith("_")]
                assert not private, f"minorsft/train/{rel} imports {private} from {module}"
        for node in ast.walk(tree):   # ms._something
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ms":
                assert not node.attr.startswith("_"), f"minorsft/train/{rel} uses ms.{node.attr}"


@pytest.mark.parametrize("top", ["minorsft", "kernels"])
def test_functions_are_short(top):
    long = []
    for rel, tree in _modules(os.path.join(ROOT, top)):
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{top}/{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions longer than %d lines: %s" % (MAX_FUNCTION_LINES, long)
