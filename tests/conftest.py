"""Shared fixtures and helpers. The tests import hybrid.py from the repository root."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leakage import console  # noqa: E402
from leakage.data import PHOTOGRAPHS, PrivateImage, load_photographs  # noqa: E402
from leakage.modules import build_model  # noqa: E402
from leakage.paper import client_gradient, recursive_reconstruction  # noqa: E402
from leakage.record import CSV_COLUMNS  # noqa: E402

HUNG_RUNS: list[str] = []  # what a test's subprocess was doing when it hung (test_hostile.py)


def pytest_terminal_summary(terminalreporter):
    """A hang that a test expects now and then (an xfail) is still reported in full: where
    the run waited is what it takes to mend it."""
    for report in HUNG_RUNS:
        terminalreporter.section("a run that hung: its threads")
        terminalreporter.write_line(report)


@pytest.fixture(autouse=True)
def process_as_it_was():
    """main() sets its process's thread counts and progress lines (configure_process); a
    test that calls it in process must not leave the rest of the suite on one thread, or
    printing progress."""
    torch_threads, blas = torch.get_num_threads(), {i["user_api"]: i["num_threads"] for i in threadpool_info()}
    yield
    torch.set_num_threads(torch_threads)
    threadpool_limits(blas)
    console.progress_in_logs(False)


@pytest.fixture(scope="session")
def chelsea() -> PrivateImage:
    return load_photographs([3])[0]


@pytest.fixture(scope="session")
def photographs() -> list[PrivateImage]:
    return load_photographs(list(range(len(PHOTOGRAPHS))))


@pytest.fixture(scope="session")
def cnn2_c2_rgap(chelsea):
    """cnn2_c2 on chelsea: the model, the shared gradient, R-GAP's image and deficiencies."""
    model = build_model("cnn2_c2")
    grads = client_gradient(model, chelsea.x, chelsea.label)
    return model, grads, *recursive_reconstruction([model], [grads])[0][:2]


def run_script(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """python hybrid.py ARGS as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "hybrid.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


QUICK = ["--quick", "--source", "samples", "--attacks", "rgap"]  # a smoke test's attack on the photographs


def one_line(err: str) -> str:
    """A refusal's text: one line, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def the_folder(output: Path) -> Path:
    """The one run folder under an output folder."""
    (folder,) = [p for p in output.iterdir() if p.is_dir()]
    return folder


def rows_of(folder: Path) -> list[dict]:
    with (folder / "results.csv").open() as f:
        return list(csv.DictReader(f))


def comparable(rows: list[dict]) -> list[tuple]:
    """Rows as sets of values, everything but the timing, which differs run to run."""
    return sorted(tuple(r[c] for c in CSV_COLUMNS if c != "seconds") for r in rows)


# The start of a sitecustomize.py that audits a run (and its workers): the path an audit
# event opens for writing, or None.
OPENED_FOR_WRITING = '''
import os, sys

def _opened_for_writing(event, args):
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return None
    mode, flags = args[1], args[2] or 0
    writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR)
    return os.fsdecode(args[0]) if writes else None
'''


def audited(tmp_path: Path, hook: str, **env: str) -> dict:
    """An environment in which python loads OPENED_FOR_WRITING + `hook` at start-up."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(OPENED_FOR_WRITING + hook)
    return dict(os.environ, PYTHONPATH=str(site), **env)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs and long optimisations; "
                            "pytest -m 'not slow' skips them for a sub-minute inner loop")


def fresh_run(tmp_path_factory, name: str, *args: str) -> Path:
    """python hybrid.py ARGS into a new output folder; returns its one run folder."""
    out = tmp_path_factory.mktemp(name)
    result = run_script(*args, "--output", str(out))
    assert result.returncode == 0, result.stderr
    (folder,) = list(out.iterdir())
    return folder
