"""Check the adapter's rows against a vLLM source tree, without importing it: the installed vLLM (the
contract test) or the Python sources of another release's wheel (``make vllm-compat``).

For each row that applies to the tree's version: the module exists; the symbol is defined or imported
there (a star import is followed); a callable's parameters start with the row's; a field is a class-body
name (annotation, assignment, method or property) or an attribute a method of the class (or of a base
class found in the tree) assigns on ``self``; an environment variable is a key of
`vllm.envs.environment_variables`. Rows that do not apply to the version are reported as such and, where
the symbol is gone, confirm that the row's range is right.

Usage: ``python -m steer_server.serving.vllm_adapter.compat [--wheel WHEEL ...] [--markdown]``.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .table import ROW_BY_KEY, ROWS, Row

SOURCE_PREFIX = "vllm/"


@dataclass(frozen=True)
class RowResult:
    """What a source tree says about one row: ``ok``, ``broken`` (applies, but does not match: `detail`)
    or ``n/a`` (does not apply to this version; `detail` says whether the symbol is still there)."""

    row: Row
    status: str
    detail: str = ""


class SourceTree:
    """vLLM's Python sources, from a folder (the package's parent) or a wheel, parsed on demand."""

    def __init__(self, files: dict[str, str], version: str) -> None:
        self.files = files  # "vllm/x/y.py" -> source
        self.version = version

    @classmethod
    def from_folder(cls, package: Path) -> SourceTree:
        """The sources of the `vllm` package folder `package`."""
        files = {
            SOURCE_PREFIX + str(p.relative_to(package)).replace("\\", "/"): p.read_text(encoding="utf-8")
            for p in package.rglob("*.py")
        }
        return cls(files, _version_of(files))

    @classmethod
    def from_wheel(cls, wheel: Path) -> SourceTree:
        """The `.py` sources of a vLLM wheel."""
        with zipfile.ZipFile(wheel) as archive:
            files = {
                name: archive.read(name).decode("utf-8")
                for name in archive.namelist()
                if name.startswith(SOURCE_PREFIX) and name.endswith(".py")
            }
        return cls(files, _version_of(files, wheel.name))

    def module_path(self, module: str) -> str | None:
        base = module.replace(".", "/")
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self.files:
                return candidate
        return None

    @cache  # noqa: B019 - one tree per check, kept for its lifetime
    def parse(self, module: str) -> ast.Module | None:
        path = self.module_path(module)
        return None if path is None else ast.parse(self.files[path], filename=path)


def _version_of(files: dict[str, str], wheel_name: str = "") -> str:
    for name in ("vllm/_version.py", "vllm/version.py"):
        match = re.search(
            r"""(?:__version__|version)\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", files.get(name, "")
        )
        if match:
            return match.group(1)
    match = re.match(r"vllm-([^-]+)-", wheel_name)
    if match:
        return match.group(1)
    raise ValueError("cannot tell the vLLM version of this source tree")


def _resolve_relative(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _find(tree: SourceTree, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
    """The node defining `name` at the top level of `module` (following imports), with its module."""
    parsed = tree.parse(module)
    if parsed is None or depth > 6:
        return None
    is_package = (tree.module_path(module) or "").endswith("__init__.py")
    stars = []
    for node in ast.walk(parsed) if depth == 0 else parsed.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return module, node
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return module, node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return module, node
        if isinstance(node, ast.ImportFrom):
            source = _resolve_relative(module, node, is_package)
            for alias in node.names:
                if alias.name == "*":
                    stars.append(source)
                elif (alias.asname or alias.name) == name:
                    found = _find(tree, source, alias.name, depth + 1)
                    return found if found is not None else (module, node)
    for source in stars:
        found = _find(tree, source, name, depth + 1)
        if found is not None:
            return found
    return None


def _parameters(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        return [] if init is None else _parameters(init)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return [a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]]
    return []


def _member(tree: SourceTree, module: str, cls: ast.ClassDef, name: str, depth: int = 0) -> ast.AST | None:
    """`name` in class `cls`: a class-body definition, or an attribute assigned on ``self`` in a method;
    base classes found in the tree are searched too."""
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return node
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return node
    for walked in ast.walk(cls):
        targets: list[ast.expr] = (
            list(walked.targets)
            if isinstance(walked, ast.Assign)
            else [walked.target]
            if isinstance(walked, ast.AnnAssign)
            else []
        )
        for target in targets:
            if (
                isinstance(target, ast.Attribute)
                and target.attr == name
                and isinstance(target.value, ast.Name)
                and target.value.id == "self"
            ):
                return walked
    if depth > 4:
        return None
    for base in cls.bases:
        base_name = (
            base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
        )
        found = _find(tree, module, base_name) if base_name else None
        if found is not None and isinstance(found[1], ast.ClassDef):
            member = _member(tree, found[0], found[1], name, depth + 1)
            if member is not None:
                return member
    return None


def _locate(tree: SourceTree, row: Row) -> tuple[ast.AST | None, str]:
    """The row's node in the tree, or None and why."""
    if tree.module_path(row.module) is None:
        return None, f"module {row.module} is gone"
    if row.kind == "env":
        parsed = tree.parse(row.module)
        keys = {
            key.value
            for node in ast.walk(parsed)  # type: ignore[arg-type]
            if isinstance(node, ast.Dict)
            for key in node.keys
            if isinstance(key, ast.Constant)
        }
        return (
            (ast.Constant(row.name), "") if row.name in keys else (None, f"{row.name} is not a vLLM variable")
        )
    head, *rest = row.name.split(".")
    found = _find(tree, row.module, head)
    if found is None:
        return None, f"{row.module}.{head} is gone"
    module, node = found
    for part in rest:
        if not isinstance(node, ast.ClassDef):
            return None, f"{head} is not a class"
        member = _member(tree, module, node, part)
        if member is None:
            return None, f"{head}.{part} is gone"
        node = member
    return node, ""


def check_row(tree: SourceTree, row: Row) -> RowResult:
    """The row against the tree (see the module's docstring)."""
    node, why = _locate(tree, row)
    if not row.applies_to(tree.version):
        return RowResult(row, "n/a", "gone, as the row's range says" if node is None else "present, not used")
    if node is None:
        return RowResult(row, "broken", why)
    if row.params:
        if isinstance(node, ast.ImportFrom):
            return RowResult(row, "ok", "imported name (parameters checked where defined)")
        names = _parameters(node)
        if names[: len(row.params)] != list(row.params):
            return RowResult(
                row, "broken", f"parameters {names}, the plugin expects {list(row.params)} first"
            )
    return RowResult(row, "ok")


def check_tree(tree: SourceTree) -> list[RowResult]:
    """Every row against the tree."""
    return [check_row(tree, row) for row in ROWS]


def markdown(results: dict[str, list[RowResult]]) -> str:
    """A table: one line per row, one column per version (the README's and the closing note's table)."""
    versions = list(results)
    lines = [
        "| row | vLLM symbol | runner | " + " | ".join(versions) + " |",
        "|---|---|---|" + "---|" * len(versions),
    ]
    for index, row in enumerate(ROWS):
        cells = []
        for version in versions:
            result = results[version][index]
            cells.append(result.status + (f" ({result.detail})" if result.status == "broken" else ""))
        lines.append(f"| `{row.key}` | `{row.symbol}` | {row.runner or '-'} | " + " | ".join(cells) + " |")
    totals = [
        f"{v}: {sum(r.status == 'ok' for r in rs)} ok, {sum(r.status == 'broken' for r in rs)} broken, "
        f"{sum(r.status == 'n/a' for r in rs)} n/a"
        for v, rs in results.items()
    ]
    return "\n".join([*lines, "", "; ".join(totals)])


def registered_connectors(tree: SourceTree, key: str) -> list[str]:
    """The names a connector factory registers in the tree (its ``register_connector("Name", ...)``
    calls; rows ``kv.factory.registry``, ``ec.factory.registry``)."""
    module = tree.parse(ROW_BY_KEY[key].module)
    if module is None:
        return []
    return sorted(
        {
            node.args[0].value
            for node in ast.walk(module)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "register_connector"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        }
    )


def connector_markdown(trees: list[SourceTree]) -> tuple[str, int]:
    """Every KV and encoder-cache connector the trees register, with its classification
    (:data:`..kv_transfer.KV_CONNECTORS`, :data:`..kv_transfer.EC_CONNECTORS`); and how many a tree
    registers that the tables lack."""
    from ..kv_transfer import EC_CONNECTORS, KV_CONNECTORS

    present = {
        (key, tree.version): set(registered_connectors(tree, key))
        for key in ("kv.factory.registry", "ec.factory.registry")
        for tree in trees
    }
    lines = [
        "| connector | kind | " + " | ".join(t.version for t in trees) + " | allowed | keyed by | why |",
        "|---|---|" + "---|" * len(trees) + "---|---|---|",
    ]
    unclassified = 0
    for key, kind, table in (
        ("kv.factory.registry", "KV", KV_CONNECTORS),
        ("ec.factory.registry", "EC", EC_CONNECTORS),
    ):
        names = sorted(set().union(*(present[(key, t.version)] for t in trees)) | set(table))
        for name in names:
            known = table.get(name)
            unclassified += known is None
            cells = ["yes" if name in present[(key, t.version)] else "-" for t in trees]
            verdict = (
                "**unclassified: refused**" if known is None else ("yes" if known.allowed else "refused")
            )
            lines.append(
                f"| `{name}` | {kind} | " + " | ".join(cells) + f" | {verdict} | "
                f"{known.keyed_by if known else '-'} | {known.why if known else '-'} |"
            )
    return "\n".join(lines), unclassified


def installed_tree() -> SourceTree:
    """The installed vLLM's sources (found without importing vLLM)."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise RuntimeError("vLLM is not installed")
    return SourceTree.from_folder(Path(spec.origin).parent)


def main(argv: list[str] | None = None) -> int:
    """Check the installed vLLM and every `--wheel`; print the table; exit 1 if a row is broken."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, action="append", default=[], help="a vLLM wheel to check")
    parser.add_argument("--no-installed", action="store_true", help="skip the installed vLLM")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    trees = [] if args.no_installed else [installed_tree()]
    trees += [SourceTree.from_wheel(w) for w in args.wheel]
    results = {tree.version: check_tree(tree) for tree in trees}
    connectors, unclassified = connector_markdown(trees)
    text = markdown(results) + "\n\n## KV and encoder-cache connectors\n\n" + connectors
    print(text)
    if args.markdown:
        heading = (
            "# The vLLM adapter's rows against vLLM releases\n\n"
            "Written by `make vllm-compat` (`python -m steer_server.serving.vllm_adapter.compat`): every row of "
            "`steer_server/serving/vllm_adapter/table.py` checked against each release's Python sources. "
            "`ok`: present with the parameters the plugin relies on; `n/a`: the row does not apply to that "
            "release (its range says so); `broken`: it applies and does not match. The connectors' table: "
            "each KV and encoder-cache connector a release registers, and whether the plugin allows it "
            "(`steer_server/serving/kv_transfer.py`).\n\n"
        )
        args.markdown.write_text(heading + text + "\n")
    return int(unclassified > 0 or any(r.status == "broken" for rs in results.values() for r in rs))


if __name__ == "__main__":
    sys.exit(main())
