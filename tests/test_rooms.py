"""The rooms: the paper in leakage/paper.py, every other concern in a file named for it.
hybrid.py is the entry point: no library module imports it (run as __main__, a second copy
would give a --jobs run two copies of every table and class), the rooms import each other
without a cycle, and no file outgrows a reader."""
import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = sorted((ROOT / "leakage").glob("*.py"))


def runtime_imports(path: Path) -> set[str]:
    """The leakage rooms a file imports when it runs (not those under TYPE_CHECKING), and hybrid."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name == "hybrid" or a.name.startswith("leakage.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "leakage":
                out |= {f"leakage.{a.name}" for a in node.names}
            elif node.module.startswith("leakage.") or node.module == "hybrid":
                out.add(node.module)
    return {m.removeprefix("leakage.") for m in out}


def test_no_library_module_imports_hybrid():
    importers = [p.name for p in ROOMS if "hybrid" in runtime_imports(p)]
    assert importers == []


def test_the_rooms_import_each_other_without_a_cycle():
    graph = {p.stem: runtime_imports(p) - {"hybrid"} for p in ROOMS}
    done, path = set(), []

    def visit(room):
        assert room not in path, " -> ".join(path[path.index(room):] + [room])
        if room in done:
            return
        path.append(room)
        for other in graph.get(room, ()):
            visit(other)
        path.pop()
        done.add(room)
    for room in graph:
        visit(room)


def test_the_paper_fits_a_reader_and_no_file_is_over_about_a_thousand_lines():
    lengths = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
               for p in [*ROOT.glob("*.py"), *ROOMS, *(ROOT / "studies").glob("*.py"), *(ROOT / "tests").glob("*.py")]}
    assert lengths["leakage/paper.py"] < 900
    assert {name: n for name, n in lengths.items() if n > 1050} == {}


def test_each_room_imports_alone_and_says_what_it_holds():
    for path in ROOMS:
        assert ast.get_docstring(ast.parse(path.read_text())), path.name
    out = subprocess.run([sys.executable, "-c", "; ".join(f"import leakage.{p.stem}" for p in ROOMS[::-1])],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_the_project_installs_and_imports_from_any_folder(tmp_path):
    """pip builds it (pyproject.toml): the wheel holds hybrid.py and every room, and from
    outside the checkout, with the wheel alone on the path, `import hybrid` gives the API."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hybrid.py" in names and {f"leakage/{p.name}" for p in ROOMS} <= names
    script = "import hybrid; print(hybrid.__file__, hybrid.attack.__module__, hybrid.analyse.__module__)"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(wheel)})
    assert out.returncode == 0, out.stderr
    where, *api = out.stdout.split()
    assert where.startswith(str(wheel)) and api == ["leakage.api", "leakage.api"]
