"""A run killed, or finding its disk full, at each of its writes; a run whose stdout is
closed. Each time: nothing it finished is lost, results.json and results.csv agree once
it is resumed, and what stops it says so in one line."""
import dataclasses
import gc
import json
import subprocess
import sys

import pytest

import hybrid as H
from leakage import sweeps
from leakage.attacks import ATTACKS
from conftest import ROOT, audited, comparable, fresh_run, rows_of, run_script

RUN = ["--quick", "--source", "samples", "--model", "cnn2_c0", "--index", "0,3", "--attacks", "rgap", "idlg"]
N_ATTACKS = 4

# At the N-th opening for writing of a path that ends in SUFFIX (FAULT_AT=SUFFIX:N:HOW),
# the process is SIGKILLed ("kill") or the open fails as on a full disk ("full").
HOOK = '''
import errno, signal
_suffix, _nth, _how = os.environ["FAULT_AT"].rsplit(":", 2)
_seen = 0

def _hook(event, args):
    global _seen
    path = _opened_for_writing(event, args)
    if path and path.endswith(_suffix):
        _seen += 1
        if _seen == int(_nth):
            if _how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device", path)

sys.addaudithook(_hook)
'''


def recorded(folder):
    """(model, image, attack) -> its results.json entry."""
    runs = json.loads((folder / "results.json").read_text())["runs"]
    return {(r["model"], r["image"], a): e for r in runs for a, e in r.get("attacks", {}).items()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return fresh_run(tmp_path_factory, "clean", *RUN)


def run_with_fault(tmp_path, fault, *args):
    return run_script(*RUN, *args, env=audited(tmp_path, HOOK, FAULT_AT=fault))


def resume(folder):
    return run_script(*RUN, "--resume", str(folder))


def check_resumes_to_the_clean_run(folder, clean):
    before = recorded(folder)
    out = resume(folder)
    assert out.returncode == 0, out.stderr
    after = recorded(folder)
    assert all(after[k] == e for k, e in before.items())  # what it had finished, untouched
    assert sum("  SSIM " in line for line in out.stdout.splitlines()) == N_ATTACKS - len(before)  # and not redone
    assert comparable(rows_of(folder)) == comparable(rows_of(clean))  # the two records agree, and are complete


@pytest.mark.slow
@pytest.mark.parametrize("fault", [
    "results.csv:2:kill",  # after the 2nd attack's results.json, before its row: the point between the two
    "results.json.tmp:3:kill",  # after the 2nd attack's .npy, before its results.json
    "idlg.npy:1:kill",  # during an attack's recording
])
def test_a_kill_at_any_write_loses_nothing_finished(tmp_path, clean, fault):
    out = run_with_fault(tmp_path, fault, "--output", str(tmp_path / "out"))
    assert out.returncode == -9, out.stderr
    (folder,) = list((tmp_path / "out").iterdir())
    done = recorded(folder)
    written = (folder / "results.csv").exists()
    rows = {(r["model"], r["image"], r["attack"]) for r in rows_of(folder)} if written else set()
    assert rows <= set(done) and len(done) - len(rows) <= 1  # the table lags the record by the attack in flight
    check_resumes_to_the_clean_run(folder, clean)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["results.json.tmp:3:full", "cnn2_c0_samples-chelsea_rgap.npy:1:full",
                                   "results.csv:3:full", "comparison.png:1:full", "summary.md.tmp:1:full"])
def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing(tmp_path, clean, fault):
    out = run_with_fault(tmp_path, fault, "--output", str(tmp_path / "out"))
    (folder,) = list((tmp_path / "out").iterdir())
    assert out.returncode == 1 and "Traceback" not in out.stderr
    (line,) = [l for l in out.stderr.splitlines() if l.strip()]
    assert line.startswith("hybrid.py: stopped: No space left on device") and f"--resume {folder}" in line
    check_resumes_to_the_clean_run(folder, clean)


@pytest.mark.slow
def test_a_closed_stdout_does_not_stop_the_run(tmp_path, clean):
    """`python hybrid.py | head -1`: the reader goes away; the run goes on to the end."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "hybrid.py"), *RUN, "--output", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the run has written a line
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, err
    assert "stdout was closed" in err and "Traceback" not in err and "Exception ignored" not in err
    (folder,) = list(tmp_path.iterdir())
    assert comparable(rows_of(folder)) == comparable(rows_of(clean)) and len(recorded(folder)) == N_ATTACKS


def test_an_error_in_one_pair_costs_that_pair_alone_and_frees_the_folder(tmp_path, monkeypatch, capsys):
    """One process (--jobs 1), as in the workers: a pair whose attack raises is reported and
    left for --resume; the others are recorded; the folder's lock is free after main returns,
    even while the collector is off (it once lived as long as the exception's frames)."""
    idlg, calls = ATTACKS["idlg"].run, []

    def failing_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug on this pair")
        return idlg(*args)

    monkeypatch.setitem(ATTACKS, "idlg", dataclasses.replace(ATTACKS["idlg"], run=failing_once))
    gc.disable()
    try:
        assert H.main([*RUN, "--output", str(tmp_path)]) == 1
        (folder,) = list(tmp_path.iterdir())
        sweeps.FolderLock(folder).close()  # free
    finally:
        gc.enable()
    err = capsys.readouterr().err
    assert "cnn2_c0 on samples:astronaut: ValueError: a bug on this pair" in err and f"--resume {folder}" in err
    assert sorted(k[1:] for k in recorded(folder)) == [("samples:astronaut", "rgap"), ("samples:chelsea", "idlg"),
                                                       ("samples:chelsea", "rgap")]
    monkeypatch.undo()
    assert H.main([*RUN, "--output", str(tmp_path), "--resume", str(folder)]) == 0
    assert len(recorded(folder)) == N_ATTACKS
