"""The documentation's relative links and anchors resolve, the README starts with how
to run and test, and the committed tables are what their scripts make of the committed runs."""
import re
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
    assert len(ROOT.joinpath("README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("script, args, table", [
    ("study_table.py", ["assets/study_cifar_random.json", "assets/study_random.json"],
     "assets/study_cifar_random_vs_photographs.md"),
    ("study_table.py", ["assets/study_cifar_trained.json", "assets/study_trained.json"],
     "assets/study_cifar_trained_vs_photographs.md"),
    ("study_table.py", ["assets/study_cifar_trained.json", "assets/study_cifar_random.json",
                        "--names", "trained", "random", "--images", "0-9"],
     "assets/study_cifar_trained_vs_random.md"),
    ("study_table.py", ["assets/baselines_cifar.json", "assets/study_cifar_random.json", "--names", "baselines",
                        "the study", "--images", "0-9", "--models", "cnn2_c2", "cnn3_c1", "cnn3_c11", "cnn4_c1",
                        "cnn4_c2", "lenet"],
     "assets/baselines_cifar_vs_study.md"),
    ("heldout_table.py", ["assets/heldout.json", "assets/study_cifar_random.json", "--images", "0-4"],
     "assets/heldout_table.md")])
def test_a_committed_table_is_what_its_script_makes_of_the_committed_runs(script, args, table):
    made = subprocess.run([sys.executable, str(ROOT / "assets" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=True).stdout
    assert made == (ROOT / table).read_text()
