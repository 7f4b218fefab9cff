"""The layout's rules, read from the source: dependencies point one way and nothing links
outside the repository.

* The operator contract (``references/spec.py``, ``references/operators.py``) is the ground
  floor: it imports only torch and itself.
* ``kernels/`` and ``references/`` never import ``harness``; kernels take from ``references``
  the contract alone, never a reference's math; references never import kernels.
* No import circle among the modules of ``harness/`` (every import statement counts, at module
  level or inside a function: a circle of lazy imports is still a circle a reader must untangle).
* No file of the project points outside the repository: no relative link or path that climbs
  out of it (the shared folder beside a checkout), no web link. Package indexes in install
  commands are not links to content, so they are allowed (``PACKAGE_INDEXES``).

Each rule was checked once by breaking it (an import of harness in a kernel, a circle between
two harness modules, a link to the shared folder in a doc)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "kernels", "references")
CONTRACT = {"references.spec", "references.operators"}
PACKAGE_INDEXES = ("https://download.pytorch.org/whl/",)
SHARED = "/".join(("..", "shared"))  # the folder beside a checkout, spelled so as not to name it
URL = re.compile(r"https?://[^\s)>\]'\"`]+")
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports: ``import a.b``, ``from a.b import c`` (a.b.c when
    that is a module, else a.b), relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) for name, path in known.items()}


def test_the_contract_imports_nothing_of_the_project_but_itself(graph):
    for name in CONTRACT:
        assert graph[name] <= CONTRACT, (name, graph[name] - CONTRACT)


def test_kernels_and_references_do_not_import_the_harness(graph):
    bad = {(m, d) for m, deps in graph.items() if m.split(".")[0] in ("kernels", "references")
           for d in deps if d.split(".")[0] == "harness"}
    assert bad == set()


def test_kernels_take_only_the_contract_from_references_and_references_no_kernels(graph):
    bad = {(m, d) for m, deps in graph.items() for d in deps
           if (m.startswith("kernels") and d.startswith("references") and d not in CONTRACT)
           or (m.startswith("references") and d.startswith("kernels"))}
    assert bad == set()


def cycles(graph: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Every import circle among the modules under ``prefix`` (one path per circle found)."""
    nodes = {m for m in graph if m == prefix or m.startswith(prefix + ".")}
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m] & nodes):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(nodes):
        if m not in state:
            visit(m)
    return found


def test_no_import_circle_inside_the_harness(graph):
    assert cycles(graph, "harness") == []


def test_the_circle_finder_finds_a_circle():
    graph = {"harness.a": {"harness.b"}, "harness.b": {"harness.c"}, "harness.c": {"harness.a"},
             "harness.d": set()}
    assert cycles(graph, "harness") == [["harness.a", "harness.b", "harness.c", "harness.a"]]


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    paths = [ROOT / p for p in listed.stdout.splitlines()] if listed.returncode == 0 else \
        [p for p in ROOT.rglob("*") if ".git" not in p.parts]
    return [p for p in paths if p.is_file() and p.suffix in
            (".py", ".md", ".toml", ".txt", ".cfg", ".sh", ".html", ".json", "") and
            p.stat().st_size < 5_000_000]


def outside_links(path: Path, text: str) -> list[str]:
    """What in ``text`` (the content of ``path``) points outside the repository."""
    bad = [u for u in URL.findall(text) if not u.startswith(PACKAGE_INDEXES)]
    if SHARED in text:
        bad.append(SHARED)
    for target in MD_LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a web link (found above) or an anchor
        resolved = (path.parent / target.split("#")[0]).resolve()
        if ROOT not in resolved.parents and resolved != ROOT:
            bad.append(target)
    return bad


def test_no_project_file_links_outside_the_repository():
    bad = {}
    for path in tracked_text_files():
        if path == Path(__file__).resolve():
            continue  # its examples of what is forbidden
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found = outside_links(path, text)
        if found:
            bad[str(path.relative_to(ROOT))] = found[:3]
    assert bad == {}


def test_the_link_finder_finds_links_out():
    doc = ROOT / "docs" / "x.md"
    assert outside_links(doc, f"see [the math](../{SHARED}/OPERATORS.md)") == [
        SHARED, f"../{SHARED}/OPERATORS.md"]
    assert outside_links(doc, "at https://example.org/page.") == ["https://example.org/page."]
    assert outside_links(doc, "[ops](operators.md) and `pip install torch --index-url "
                              "https://download.pytorch.org/whl/cpu`") == []
