"""The documentation's relative links and anchors resolve, the README starts with how
to run and test, and the committed tables are what their scripts make of the committed runs."""
import fnmatch
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def without_code(text: str) -> str:
    """Markdown outside fenced code blocks and inline code spans."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-', repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M),
                              flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(without_code(page.read_text())) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    assert links(page) or page.name != "README.md"  # the README links to its pages, so the test can fail
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target} (no such file)"
        if anchor:
            assert anchor in anchors(file), f"{page.name}: {target} (no such heading in {file.name})"


def test_the_anchor_rule_is_githubs():
    page = ROOT / "docs" / "attacks.md"
    assert "dlg-is-chaotic-read-it-over-starts-with---restarts" in anchors(page)


def test_the_readme_says_how_to_run_and_test_in_its_first_40_lines():
    first = ROOT.joinpath("README.md").read_text().splitlines()[:40]
    assert any(line.startswith("python hybrid.py") for line in first)
    assert any("pytest" in line and "tests" in line for line in first)
    assert len(ROOT.joinpath("README.md").read_text().splitlines()) <= 300  # details go to docs/


@pytest.fixture(scope="module")
def remade_tables(tmp_path_factory) -> Path:
    """Every table studies/make_tables.sh makes from the committed runs, in a folder of its own."""
    out = tmp_path_factory.mktemp("tables")
    subprocess.run(["bash", str(ROOT / "studies" / "make_tables.sh"), str(out)], capture_output=True, text=True,
                   cwd=ROOT, timeout=600, check=True, env={**os.environ, "PYTHON": sys.executable, "TABLES_ONLY": "1"})
    return out


def test_a_committed_table_is_what_its_script_makes_of_the_committed_runs(remade_tables):
    made = sorted(remade_tables.glob("*.md"))
    assert len(made) >= 9  # the driver ran every table script
    for table in made:
        assert table.read_text() == (ROOT / "assets" / table.name).read_text(), table.name


def result_rows() -> list[list[str]]:
    """studies/README.md's table: per row, the names its first column gives (a name starting
    with '.' or '_' continues the row's first name's stem: `a.json`, `.md` is a.json and a.md)."""
    rows = []
    for line in (ROOT / "studies" / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            names = re.findall(r"`([^`]+)`", line.split("|")[1])
            stem = names[0].split(".")[0]
            rows.append([stem + n if n[0] in "._" else n for n in names])
    return rows


def test_every_committed_result_has_a_row_and_every_row_a_result():
    files = [f.relative_to(ROOT / "assets").as_posix() for f in (ROOT / "assets").rglob("*") if f.is_file()]
    covers = lambda name, f: f.startswith(name) if name.endswith("/") else fnmatch.fnmatchcase(f, name)  # noqa: E731
    names = [n for row in result_rows() for n in row]
    assert [f for f in files if not any(covers(n, f) for n in names)] == []
    assert [n for n in names if not any(covers(n, f) for f in files)] == []


def test_the_readmes_python_snippet_runs_and_reconstructs():
    """The README's ten lines of hybrid.attack, as a user pastes them."""
    text = ROOT.joinpath("README.md").read_text()
    (snippet,) = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    label, error = out.stdout.splitlines()[0].split()
    assert label == "7" and float(error) < 1e-3
    assert "'security_index': 0" in out.stdout.splitlines()[1]


def test_the_cpu_install_line_comes_first_and_pins_a_matched_pair():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    cpu = next(i for i, line in enumerate(lines) if "whl/cpu" in line)
    plain = next(i for i, line in enumerate(lines) if line.startswith("pip install -r requirements.txt"))
    assert cpu < plain and re.search(r"torch==\d+\.\d+\.\d+ torchvision==\d+\.\d+\.\d+", lines[cpu])


@pytest.mark.slow
def test_every_command_of_the_first_screen_runs_as_written(tmp_path):
    """From a fresh folder holding the checkout's files (a clone's root, as the README is
    read): each `python ...` line of the README's quick start (its first code block, how to
    run and test it), hybrid.py's with --quick where it has none, in order
    (examples/capture.py writes the files the next line reads)."""
    for name in ("hybrid.py", "examples", "leakage", "studies"):
        (tmp_path / name).symlink_to(ROOT / name)
    text = ROOT.joinpath("README.md").read_text()
    block = text[text.index("```bash"):].split("```")[1].splitlines()
    commands = [shlex.split(line.split("  #")[0]) for line in block
                if line.startswith("python ") and "pytest" not in line]
    assert len(commands) >= 5 and ["python", "examples/capture.py"] in commands
    for command in commands:
        if command[1] == "hybrid.py" and "--quick" not in command:
            command = [*command, "--quick"]
        out = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"{' '.join(command)}: {out.stderr[-2000:]}"


def test_the_records_example_in_output_md_uses_the_records_own_keys(tmp_path):
    """docs/output.md's results.json, key by key, against a record written now ("indices" once
    stood where records say "image_indices")."""
    import json

    import hybrid as H

    text = (ROOT / "docs" / "output.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.S)[1])
    assert H.main(["--quick", "--source", "samples", "--index", "3", "--model", "cnn2_c0", "--attacks", "rgap",
                   "--output", str(tmp_path)]) == 0
    (folder,) = tmp_path.iterdir()
    record = json.loads((folder / "results.json").read_text())

    def keys(shown: dict, real: dict, where: str) -> None:
        for key, value in shown.items():
            if key == "...":
                continue
            assert key in real, f"{where}{key}"
            if isinstance(value, dict) and key not in ("attacks",):
                keys(value, real[key], f"{where}{key}.")
    keys(example, record, "")
    keys(example["runs"][0], record["runs"][0], "runs.")
    keys(example["runs"][0]["attacks"]["rgap"], record["runs"][0]["attacks"]["rgap"], "runs.attacks.rgap.")
    keys(example["stretches"][0], record["stretches"][0], "stretches.")


def test_the_captured_gradient_snippet_of_usage_md_runs_as_written(tmp_path):
    """docs/usage.md, "A gradient you captured": the Python that saves weights.pt and grad.pt,
    then the commands that attack them, from a folder laid out as the checkout (with
    --quick and R-GAP alone): the image comes back, its label read from the gradient."""
    import json

    (tmp_path / "examples").symlink_to(ROOT / "examples")
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text[text.index("## A gradient you captured"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)[1]
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    commands = [shlex.split(line) for line in re.search(r"```bash\n(.*?)```", section, re.S)[1].splitlines()]
    assert len(commands) == 2
    for n, command in enumerate(commands):
        assert command[:2] == ["python", "hybrid.py"]
        run = [sys.executable, str(ROOT / "hybrid.py"), *command[2:], "--quick", "--attacks", "rgap",
               "--output", str(tmp_path / f"out{n}")]
        out = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        (folder,) = (tmp_path / f"out{n}").iterdir()
        (entry,) = json.loads((folder / "results.json").read_text())["runs"]
        assert entry["attacks"]["rgap"]["label"] == 7
    assert entry["attacks"]["rgap"]["psnr"] > 40  # the second names the image: scored


def test_each_rows_commit_is_the_one_that_committed_its_files_as_they_are():
    """studies/README.md's commit column: per row, the newest of `git log -1 -- FILE` over
    its files (ten rows once named the commit that first made a file, not the one after)."""
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("needs the repository's whole history (a git checkout, not shallow)")
    files = [f.relative_to(ROOT / "assets").as_posix() for f in (ROOT / "assets").rglob("*") if f.is_file()]
    covers = lambda name, f: f.startswith(name) if name.endswith("/") else fnmatch.fnmatchcase(f, name)  # noqa: E731
    commits = [line.split("|")[3].strip() for line in (ROOT / "studies" / "README.md").read_text().splitlines()
               if line.startswith("| `")]
    last: dict[str, tuple[int, str]] = {}  # each file: the newest commit that touched it (git log's first)
    log = subprocess.run(["git", "log", "--format=C %ct %H", "--name-only", "--", "assets"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    for line in log.splitlines():
        if line.startswith("C "):
            _, when, commit_ = line.split()
        elif line:
            last.setdefault(line.removeprefix("assets/"), (int(when), commit_))
    wrong = []
    for names, commit in zip(result_rows(), commits):
        newest = max(last[f] for f in files if any(covers(n, f) for n in names))[1]
        if not newest.startswith(commit):
            wrong.append(f"{names[0]}: {commit}, not {newest[:7]}")
    assert wrong == []
