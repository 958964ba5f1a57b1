"""--jobs: pairs in worker processes, the same numbers as one process, the parent alone
writing the folder, and a worker's death costing no more than its own pair."""
import json
import os
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest

import hybrid as H
from leakage import sweeps
from conftest import audited, comparable, fresh_run, rows_of, run_script

GRID = ["--quick", "--source", "samples", "--model", "cnn2_c0", "cnn3_c4", "--index", "0,3",
        "--attacks", "rgap", "dlg", "idlg", "cosine", "hybrid"]


def entries(folder):
    """(model, image, attack) -> its results.json entry less the timing (and the images it was
    gradient-matched with, which two workers share out), and its array."""
    runs = json.loads((folder / "results.json").read_text())["runs"]
    return {(r["model"], r["image"], a): ({k: v for k, v in e.items() if k not in ("seconds", "npy", "batch_size")},
                                          np.load(folder / e["npy"]))
            for r in runs for a, e in r["attacks"].items()}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return fresh_run(tmp_path_factory, "jobs1", *GRID)


@pytest.mark.slow
def test_two_jobs_give_the_numbers_of_one(one_process, tmp_path):
    out = run_script(*GRID, "--jobs", "2", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (folder,) = list(tmp_path.iterdir())
    assert comparable(rows_of(folder)) == comparable(rows_of(one_process))
    expected, got = entries(one_process), entries(folder)
    assert got.keys() == expected.keys() and len(got) == 2 * 2 * 5
    for key, (entry, array) in expected.items():  # attack by attack: every number and pixel
        assert got[key][0] == entry, key
        assert np.array_equal(got[key][1], array), key
    runs = json.loads((folder / "results.json").read_text())["runs"]
    assert all("security_index" in r for r in runs) and (folder / "comparison.png").exists()


def crash_on_cnn2_c0(work, unit):
    """A worker that dies (as under the OOM killer) on every cnn2_c0 pair."""
    if any(cell.model == "cnn2_c0" for cell in unit):
        os.kill(os.getpid(), signal.SIGKILL)
    return sweeps.work_in_worker(work, unit)


@pytest.mark.slow
def test_a_dying_worker_loses_only_its_pair_and_resume_completes(one_process, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweeps, "work_in_worker", crash_on_cnn2_c0)  # submitted by reference: workers import it
    assert H.main([*GRID, "--jobs", "2", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "cnn2_c0 on samples:astronaut: its worker died" in err and "cnn2_c0 on samples:chelsea" in err
    (folder,) = list(tmp_path.iterdir())
    expected = [r for r in rows_of(one_process)]
    assert comparable(rows_of(folder)) == comparable([r for r in expected if r["model"] == "cnn3_c4"])
    monkeypatch.undo()
    out = run_script(*GRID, "--jobs", "2", "--output", str(tmp_path), "--resume", str(folder))
    assert out.returncode == 0, out.stderr
    assert comparable(rows_of(folder)) == comparable(expected)


# Each process logs to OPEN_LOG/<pid> that it started, then each path under WATCH it opens for writing.
HOOK = '''
_log = os.open(os.path.join(os.environ["OPEN_LOG"], str(os.getpid())), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.write(_log, b"started\\n")
_watch = os.environ["WATCH"]

def _hook(event, args):
    path = _opened_for_writing(event, args)
    if path and os.path.abspath(path).startswith(_watch):
        os.write(_log, os.fsencode(path) + b"\\n")

sys.addaudithook(_hook)
'''


@pytest.mark.slow
def test_only_the_parent_writes_the_results(tmp_path):
    (tmp_path / "log").mkdir()
    env = audited(tmp_path, HOOK, OPEN_LOG=str(tmp_path / "log"), WATCH=str(tmp_path / "out"))
    proc = run_script(*GRID[:-4], "--jobs", "2", "--output", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr
    logs = {int(p.name): p.read_text().splitlines() for p in (tmp_path / "log").iterdir()}
    writers = {pid for pid, lines in logs.items() if lines[1:]}
    assert len(logs) >= 3  # the script, its two workers (and spawn's resource tracker) were watched
    assert len(writers) == 1  # one process wrote results.csv, results.json, the .npy files, the figure
    (written,) = [logs[pid] for pid in writers]
    assert any(w.endswith("results.csv") for w in written) and any(w.endswith(".npy") for w in written)


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_bad_jobs_is_one_line(value, capsys):
    assert H.main(["--source", "samples", "--jobs", value]) == 2
    err = capsys.readouterr().err
    assert f"argument --jobs: expected a number of workers (1 or more) or 'auto', not '{value}'" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux's affinity masks")
def test_jobs_auto_is_one_on_a_process_allowed_one_core():
    """--jobs auto counts the cores this process may run on (a scheduler's allocation),
    not the machine's: allowed one core, it starts one worker."""
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert sweeps.jobs_value("auto") == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert sweeps.jobs_value("3") == 3


def fail_after_two_events(work, unit):
    """A unit whose work fails after its first two events (a cell's defence, then R-GAP's
    answer), as a SIGTERM or a bug would stop it."""
    def events(cells):
        for n, event in enumerate(work(cells)):
            if n == 2:
                raise RuntimeError("stopped part-way")
            yield event
    return sweeps.work_in_worker(events, unit)


def test_a_unit_stopped_part_way_keeps_what_it_finished_under_jobs(one_process, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweeps, "work_in_worker", fail_after_two_events)  # submitted by reference
    assert H.main([*GRID, "--jobs", "2", "--output", str(tmp_path)]) == 1
    (folder,) = list(tmp_path.iterdir())
    kept = comparable(rows_of(folder))
    assert kept and kept == comparable([r for r in rows_of(one_process) if r["attack"] == "rgap"])  # once: nothing


def test_a_grid_smaller_than_the_workers_gives_every_worker_work():
    assert [len(u) for u in sweeps.shared_out([tuple("abcd")], 2)] == [1, 1, 1, 1]  # one model's 4 images
    assert sorted(len(u) for u in sweeps.shared_out([tuple("abc"), tuple("def")], 2)) == [1, 1, 2, 2]
    assert [len(u) for u in sweeps.shared_out([tuple("abcd")], 1)] == [4]  # one worker: the batch stays
    many = [tuple("abcd")] * 5
    assert sweeps.shared_out(many, 2) == many  # enough work for both: the batches stay
    split = sweeps.shared_out([tuple("abcd"), tuple("ef")], 2)
    assert sorted(c for u in split for c in u) == list("abcdef")  # every cell once


def test_a_workers_events_wait_in_files_of_their_own_until_read(tmp_path, monkeypatch):
    """Two units in one worker, their events not yet read by the parent (a busy parent reads
    every 2 s): each event keeps its own spool file (the second unit once overwrote the first's)."""
    sent = []

    class Pipe:
        def send(self, message):
            sent.append(message)
    monkeypatch.setattr(sweeps, "_started", Pipe())
    monkeypatch.setattr(sweeps, "_spool", str(tmp_path))
    class Cell(str):
        key = property(lambda self: (str(self),))
    work = lambda unit: iter([(str(cell), f"{cell} event {n}") for cell in unit for n in range(2)])  # noqa: E731
    assert sweeps.work_in_worker(work, (Cell("a"),)) == 2 and sweeps.work_in_worker(work, (Cell("b"),)) == 2
    paths = [value for kind, value in sent if kind == "event"]
    assert len(set(paths)) == 4
    assert [pickle.loads(Path(p).read_bytes())[1] for p in paths] == [
        "a event 0", "a event 1", "b event 0", "b event 1"]
