"""Shared fixtures. The tests import hybrid.py from the repository root."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hybrid as H  # noqa: E402


@pytest.fixture(scope="session")
def chelsea() -> H.Sample:
    return H.load_samples([3])[0]


@pytest.fixture(scope="session")
def samples() -> list[H.Sample]:
    return H.load_samples(list(range(len(H.SAMPLES))))


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """python hybrid.py ARGS as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "hybrid.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


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
