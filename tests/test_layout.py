"""The package's shape: rooms import one way, files stay short, no dependency's private API."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "llama3_jax"
# A room may import itself and the rooms before it, never one after it.
ROOMS = ["config", "parallel", "model", "data", "formats", "curate", "infer", "align", "eval", "train"]
DEPENDENCIES = ("jax", "jnp", "np", "numpy", "flax", "nnx", "optax", "ocp", "orbax", "ts", "tensorstore", "grain",
                "torch", "tiktoken", "tokenizers", "safetensors", "pq", "pa", "pyarrow", "ml_dtypes", "tqdm")


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def room(path: pathlib.Path) -> str | None:
    rel = path.relative_to(PACKAGE).parts
    return rel[0].removesuffix(".py") if rel[0].removesuffix(".py") in ROOMS else None


def imported_rooms(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "llama3_jax" and len(parts) > 1 and parts[1] in ROOMS:
                out.add(parts[1])
    return out


def test_rooms_import_one_way():
    wrong = []
    for path in modules():
        here = room(path)
        if here is None:
            continue  # the package's __init__ and the `python -m llama3_jax.convert` shim
        for other in imported_rooms(path):
            if ROOMS.index(other) > ROOMS.index(here):
                wrong.append(f"{path.relative_to(PACKAGE)} ({here}) imports {other}")
    assert not wrong, wrong


def test_every_room_says_what_it_holds_and_may_import():
    for name in ROOMS[1:]:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "Imports:" in doc, name


def test_no_file_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in modules() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


# `torch._utils`, `ocp.type_handlers._x`; `from orbax.checkpoint._src import ...`.
PRIVATE_ATTRIBUTE = re.compile(rf"\b(?:{'|'.join(DEPENDENCIES)})\.(?:[A-Za-z0-9]\w*\.)*_[A-Za-z]")
PRIVATE_MODULE = re.compile(r"^\s*(?:from|import)\s+(?!llama3_jax)[\w.]*\._", re.M)


def test_no_private_api_of_a_dependency():
    found = []
    for path in modules():
        text = path.read_text()
        found += [f"{path.relative_to(PACKAGE)}: {m.group(0)}" for m in PRIVATE_ATTRIBUTE.finditer(text)]
        found += [f"{path.relative_to(PACKAGE)}: {m.group(0).strip()}" for m in PRIVATE_MODULE.finditer(text)]
        found += [f"{path.relative_to(PACKAGE)}: overrides {name}" for name in private_overrides(text)]
    assert not found, found


def private_overrides(text: str) -> list[str]:
    """Private (single-underscore) methods defined in subclasses of a dependency's class."""
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and any(_root(b) in DEPENDENCIES for b in node.bases):
            out += [f"{node.name}.{f.name}" for f in node.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and f.name.startswith("_") and not f.name.startswith("__")]
    return out


def _root(node) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def test_the_private_api_check_finds_what_the_old_converter_did():
    old = """
import orbax.checkpoint as ocp
from torch._subclasses.fake_tensor import FakeTensorMode
class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    async def _background_serialize(self, values, infos, args=None):
        return ocp._src.something
"""
    assert private_overrides(old) == ["StreamedArrayHandler._background_serialize"]
    assert PRIVATE_MODULE.search(old) and PRIVATE_ATTRIBUTE.search(old)
