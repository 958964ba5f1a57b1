"""Bad input and a hostile environment, second round: nothing lost, mixed, orphaned or hung.

Each test names the class of fault it checks; the fix is at the class's root (the closing
notes of the issue name it)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import hybrid as H
from leakage import sweeps
from leakage.cli import parse_args
from leakage.data import fit_image, image_files, load_files, read_image, to_model_space
from leakage.paper import client_gradient
from leakage.training import training_data
from conftest import HUNG_RUNS, QUICK, ROOT, one_line, rows_of, run_script, the_folder

# -- A non-finite number never poisons the record ----------------------------------------


def test_json_takes_non_finite_numbers_as_null(tmp_path):
    replaced = sweeps.write_json(tmp_path / "r.json", {"a": [1.0, float("nan")], "b": {"c": float("inf")}, "d": 2})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": [1.0, None], "b": {"c": None}, "d": 2}
    assert replaced == ["a[1]", "b.c"]


@pytest.mark.slow
def test_a_diverged_training_is_recorded_and_the_run_finishes(tmp_path):
    """lenet at lr 1 diverges (NaN loss and weights): the record says so, the next pair
    is recorded, the run ends 0, and a resume has nothing left to do."""
    args = ["--source", "samples", "--model", "lenet", "cnn2_c2", "--attacks", "rgap", "--quick",
            "--train-steps", "200", "--train-lr", "1", "--output", str(tmp_path)]
    out = run_script(*args)
    assert out.returncode == 0, out.stderr
    assert "training diverged" in out.stdout
    folder = the_folder(tmp_path)
    runs = {r["model"]: r for r in json.loads((folder / "results.json").read_text())["runs"]}
    assert runs["lenet"]["training"]["diverged"] is True and runs["lenet"]["training"]["final_loss"] is None
    assert runs["cnn2_c2"]["training"]["diverged"] is False and "rgap" in runs["cnn2_c2"]["attacks"]
    assert "skipped" in runs["lenet"] and "rgap" in runs["lenet"]["skipped"]
    again = run_script(*args, "--resume", str(folder))
    assert again.returncode == 0, again.stderr
    assert "  SSIM " not in again.stdout  # nothing redone


# -- Every recorded file is there when a run is resumed or merged ------------------------


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    assert H.main([*QUICK, "--model", "cnn2_c0", "--index", "0,3", "--output", str(out)]) == 0
    return the_folder(out)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_resume_redoes_an_attack_whose_array_is_gone_or_damaged(two_pairs, tmp_path, damage, capsys):
    folder = shutil.copytree(two_pairs, tmp_path / "copy")
    (npy,) = folder.glob("*chelsea_rgap.npy")
    npy.unlink() if damage == "delete" else npy.write_bytes(npy.read_bytes()[:60])
    assert H.main([*QUICK, "--model", "cnn2_c0", "--index", "0,3", "--resume", str(folder)]) == 0
    out = capsys.readouterr()
    assert f"{npy.name} is missing or damaged" in out.err and out.out.count("  SSIM ") == 1  # that attack alone
    assert np.load(npy).shape == (32, 32, 3) and (folder / "comparison.png").exists()


def test_merge_refuses_a_folder_whose_array_is_gone_and_makes_no_folder(two_pairs, tmp_path, capsys):
    folder = shutil.copytree(two_pairs, tmp_path / "copy")
    next(folder.glob("*astronaut_rgap.npy")).write_bytes(b"\x93NUMPY")
    assert H.main(["--merge", str(folder), "--output", str(tmp_path / "out")]) == 2
    assert "missing or damaged" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# -- Every setting checked before any folder is made -------------------------------------


@pytest.mark.parametrize("args,says", [
    (["--train-steps", "5", "--train-lr", "-5"], "--train-lr must be a positive number, not -5"),
    (["--train-steps", "5", "--train-lr", "nan"], "--train-lr must be a positive number, not nan"),
    (["--train-steps", "5", "--train-lr", "inf"], "--train-lr must be a positive number, not inf"),
    (["--train-lr", "0.1"], "--train-lr has no effect without --train-steps"),
    (["--label", "3"], "--label has no effect without --image"),
    (["--image", "x.png", "--index", "4"], "--index has no effect with --image"),
    (["--image", "x.png", "--source", "cifar10"], "--source has no effect with --image"),
    (["--analyse", "--resume", "somewhere"], "--resume has no effect with --analyse"),
    (["--analyse", "--jobs", "2"], "--jobs has no effect with --analyse"),
    (["--merge", "a", "--resume", "b"], "--resume has no effect with --merge"),
    (["--merge", "a", "--model", "cnn2_c1"], "--model has no effect with --merge"),
    (["--attacks", "rgap", "--restarts", "4"], "--restarts has no effect without dlg, idlg or cosine"),
    (["--attacks", "rgap", "--compile"], "--compile has no effect without hybrid or hybrid_free"),
    (["--attacks", "rgap", "--hybrid-iters", "4"], "--hybrid-iters has no effect without hybrid or hybrid_free"),
    (["--attacks", "hybrid", "--correct-where", "free-here"], "--correct-where has no effect without hybrid_free"),
    (["--threads", "999"], "--threads 999: this process may use"),
    (["--mod", "cnn2_c1"], "unrecognized arguments: --mod"),  # no abbreviations: a typo is not another flag
])
def test_meaningless_and_conflicting_settings_are_one_line_before_any_folder(args, says, tmp_path, capsys):
    output = [] if {"--analyse", "--merge"} & set(args) else ["--output", str(tmp_path)]  # each its own message
    assert H.main([*output, *args]) == 2
    assert says in one_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_a_repeated_list_flag_adds_to_the_list(tmp_path, capsys):
    assert H.main(["--analyse", "--source", "samples", "--model", "cnn2_c0", "--model", "cnn2_c4",
                   "--index", "0", "--index", "3"]) == 0
    out = capsys.readouterr().out
    assert all(f"{m} on samples:{i}:" in out for m in ("cnn2_c0", "cnn2_c4") for i in ("astronaut", "chelsea"))


def test_jobs_times_threads_beyond_the_cores_is_said(monkeypatch, capsys):
    monkeypatch.setattr(sweeps, "usable_cores", lambda: 2)
    args, _ = parse_args(["--jobs", "2", "--threads", "2"])
    sweeps.run_settings(args, "output")
    assert "2 workers x 2 threads on 2 usable cores" in capsys.readouterr().err


# -- Only regular files are read ----------------------------------------------------------


@pytest.mark.parametrize("make", ["fifo", "device"])
def test_a_fifo_or_a_device_is_refused_at_once(tmp_path, make, capsys):
    path = tmp_path / "x.png"
    if make == "fifo":
        os.mkfifo(path)
    else:
        path = "/dev/zero"
    start = time.monotonic()
    assert H.main(["--image", str(path), "--attacks", "rgap", "--output", str(tmp_path / "out")]) == 2
    assert "not a regular file" in one_line(capsys.readouterr().err) and time.monotonic() - start < 10


def test_a_fifo_in_a_folder_is_skipped_with_a_warning(tmp_path, capsys):
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    assert [p.rsplit("/", 1)[-1] for p in image_files([str(tmp_path)])] == ["a.png"]
    assert "skipped" in capsys.readouterr().err


@pytest.mark.parametrize("name,content", [("null", None), ("._x.png", b"\x00\x05\x16\x07 AppleDouble")])
def test_an_unreadable_image_names_its_file(tmp_path, name, content, capsys):
    path = "/dev/null" if content is None else str(tmp_path / name)
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert H.main(["--image", path, "--attacks", "rgap"]) == 2
    line = one_line(capsys.readouterr().err)
    assert path in line and "BytesIO" not in line


def test_exif_orientation_is_applied(tmp_path):
    """A phone's portrait JPEG: stored sideways, with orientation 6 (rotate 90 degrees)."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = 255  # left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_image(str(tmp_path / "phone.jpg"))
    assert upright.shape[:2] == (60, 40)  # turned upright
    assert upright[:30].mean() > 200 and upright[30:].mean() < 50  # white on top


@pytest.mark.slow
def test_a_large_image_is_read_quickly(tmp_path):
    """A 6000x6000 photograph took 86 s to load (skimage's anti-aliased resize of all of it)."""
    ramp = np.linspace(0, 255, 6000).astype(np.uint8)
    Image.fromarray(np.stack([np.add.outer(ramp, ramp // 2)] * 3, axis=-1)).save(tmp_path / "big.png",
                                                                                 compress_level=1)
    start = time.monotonic()
    (image,) = load_files([str(tmp_path / "big.png")], 0)
    assert time.monotonic() - start < 15 and image.x.shape == (1, 3, 32, 32)
    small = to_model_space(fit_image(np.asarray(Image.open(tmp_path / "big.png").convert("RGB"))))
    assert float((image.x - small).abs().max()) < 2 / 255  # the picture the full-size resize gives


# -- Merges say what they lack -------------------------------------------------------------

SHARDED = [*QUICK, "--model", "cnn2_c0", "cnn2_c4", "--index", "0,3"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    for k in range(3):
        assert H.main([*SHARDED, "--shard", f"{k}/3", "--output", str(out / str(k))]) == 0
    assert H.main([*SHARDED, "--shard", "1/2", "--output", str(out / "half")]) == 0
    return [the_folder(out / str(k)) for k in range(3)] + [the_folder(out / "half")]


def test_a_merge_that_misses_pairs_is_refused_unless_partial(shards, tmp_path, capsys):
    assert H.main(["--merge", str(shards[0]), str(shards[1]), "--output", str(tmp_path / "a")]) == 2
    assert "1 of the experiment's 4 (model, image, defence) cells are missing" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").iterdir())
    assert H.main(["--merge", str(shards[0]), str(shards[1]), "--partial", "--output", str(tmp_path / "b")]) == 0
    merged = the_folder(tmp_path / "b")
    results = json.loads((merged / "results.json").read_text())
    # cell 2: image by image, the second image's first model
    assert results["missing"] == [["cnn2_c0", "samples:chelsea"]]
    assert "missing" in (merged / "summary.md").read_text()


def test_shards_of_another_split_that_drop_a_pair_are_refused(shards, tmp_path, capsys):
    """0/3 and 1/2 of a 4-pair grid: pairs 0, 3 and 1, 3; pair 2 is in neither."""
    assert H.main(["--merge", str(shards[0]), str(shards[3]), "--output", str(tmp_path)]) == 2
    assert "cells are missing" in one_line(capsys.readouterr().err)


def test_the_whole_grid_merges(shards, tmp_path):
    assert H.main(["--merge", *map(str, shards[:3]), "--output", str(tmp_path)]) == 0
    assert len(rows_of(the_folder(tmp_path))) == 4


def test_a_merge_of_a_folder_being_written_is_refused(shards, tmp_path, capsys):
    lock = sweeps.FolderLock(shards[0])
    try:
        assert H.main(["--merge", *map(str, shards[:3]), "--output", str(tmp_path)]) == 2
        assert "is being written by another run" in one_line(capsys.readouterr().err)
    finally:
        lock.close()


def test_a_stray_file_in_the_merge_glob_is_one_line_exit_2(shards, tmp_path, capsys):
    (tmp_path / "slurm-123.out").write_text("a log")
    assert H.main(["--merge", *map(str, shards[:3]), str(tmp_path / "slurm-123.out"), "--output", str(tmp_path)]) == 2
    assert "not a run folder" in one_line(capsys.readouterr().err)


# -- Resume compares files, not how their paths are spelled -------------------------------


def test_resume_takes_the_same_image_files_from_another_directory(tmp_path, monkeypatch):
    Image.fromarray(np.full((40, 40, 3), 70, np.uint8)).save(tmp_path / "x.png")
    args = ["--image", "x.png", "--quick", "--model", "cnn2_c0", "--attacks", "rgap"]
    monkeypatch.chdir(tmp_path)
    assert H.main([*args, "--output", str(tmp_path / "out")]) == 0
    folder = the_folder(tmp_path / "out")
    monkeypatch.chdir(ROOT)
    assert H.main(["--image", str(tmp_path / "x.png"), *args[2:], "--resume", str(folder)]) == 0


def test_resume_on_a_folder_it_cannot_write_says_so_without_advice(two_pairs, tmp_path, monkeypatch, capsys):
    import errno
    import pathlib

    real_open = pathlib.Path.open

    def read_only(path, mode="r", *args, **kwargs):  # as on a file system mounted read-only
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "open", read_only)
    assert H.main([*QUICK, "--model", "cnn2_c0", "--index", "0,3", "--resume", str(two_pairs)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "Read-only file system" in line and "--resume" not in line.split("Read-only")[1]


def test_resume_of_another_experiment_says_so_before_the_lock(two_pairs, monkeypatch, capsys):
    monkeypatch.setattr(sweeps, "FolderLock", lambda folder: pytest.fail("locked before checking"))
    assert H.main([*QUICK, "--model", "cnn2_c4", "--index", "0,3", "--resume", str(two_pairs)]) == 2
    assert "it holds another experiment" in one_line(capsys.readouterr().err)


# -- Output that cannot be written -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_device_does_not_stop_the_run(tmp_path):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, str(ROOT / "hybrid.py"), *QUICK, "--model", "cnn2_c0",
                               "--output", str(tmp_path)], stdout=full, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "stdout" in proc.stderr and "No space left on device" in proc.stderr
    assert len(rows_of(the_folder(tmp_path))) == 1


@pytest.mark.slow
def test_a_non_utf8_locale_writes_every_file_as_utf8(tmp_path):
    env = dict(os.environ, LC_ALL="C", LANG="", PYTHONUTF8="0", PYTHONIOENCODING="")
    out = run_script(*QUICK, "--model", "cnn2_c0", "cnn2_c4", "cnn2_c1", "--output", str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    assert "±" in (the_folder(tmp_path) / "summary.md").read_text(encoding="utf-8")


# -- Processes: none left behind, however the parent ends --------------------------------


def children_of(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return stat_fields(pid)[0] != "Z"  # a zombie has ended


def start_sweep(tmp_path):
    # faulthandler on, so that a run which hangs can be made to say where (threads_of_a_hung_run)
    proc = subprocess.Popen([sys.executable, str(ROOT / "hybrid.py"), "--source", "samples", "--model", "cnn4_c2",
                             "--index", "0-4", "--attacks", "hybrid", "--jobs", "2", "--output", str(tmp_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    deadline = time.monotonic() + 120
    while len(children_of(proc.pid)) < 3 and time.monotonic() < deadline:  # 2 workers and the resource tracker
        time.sleep(0.5)
    workers = children_of(proc.pid)
    assert len(workers) >= 3, "the workers did not start"
    spawned = [w for w in workers if b"spawn_main" in open(f"/proc/{w}/cmdline", "rb").read()]  # not the tracker
    while min(cpu_seconds(w) for w in spawned) < 8 and time.monotonic() < deadline:
        time.sleep(0.5)  # past their imports (about 3 s) and into a pair: a worker waiting for work ends on its own
    return proc, workers


def threads_of_a_hung_run(proc) -> str:
    """What a hung run's threads wait in: the kernel's view of each, then (SIGABRT, which
    faulthandler answers) Python's traceback of each. The run ends with it."""
    kernel = []
    for task in sorted(os.listdir(f"/proc/{proc.pid}/task")):
        with open(f"/proc/{proc.pid}/task/{task}/comm") as comm, open(f"/proc/{proc.pid}/task/{task}/wchan") as wchan:
            kernel.append(f"thread {task} ({comm.read().strip()}): in {wchan.read().strip() or 'user space'}")
    children = subprocess.run(["ps", "-o", "pid,stat,wchan:24,args", "--ppid", str(proc.pid)], capture_output=True,
                              text=True).stdout
    # communicate() waits for the end of the pipe, not of the run: whoever else holds it open
    pipe = f"pipe:[{os.fstat(proc.stderr.fileno()).st_ino}]"
    holders = sorted({pid for pid, fd in open_fds() if fd == pipe} - {os.getpid()})
    children += f"processes holding its stderr open: {[process_line(pid) for pid in holders]}\n"
    proc.send_signal(signal.SIGABRT)
    try:
        err = proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        err = proc.communicate()[1]
    return "\n".join(kernel) + "\nits children:\n" + children + "\nits stderr, ending with faulthandler's dump:\n" \
        + err[-8000:]


def open_fds():
    """(pid, what the fd points to) for every fd of every process we may read."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                yield int(pid), os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # gone, or not ours
            continue


def process_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return f"{pid} {stat_fields(pid)[0]} {cmdline.read()[:120]!r}"
    except OSError:
        return f"{pid} (gone)"


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command's name (which may hold spaces): the state first."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()


def cpu_seconds(pid):
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_end_with_their_parent(tmp_path, sig):
    proc, workers = start_sweep(tmp_path)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(w) for w in workers)
    if sig == signal.SIGTERM:
        err = proc.stderr.read()
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
        assert "terminated: run the same command with --resume" in err


@pytest.mark.slow
@pytest.mark.xfail(raises=subprocess.TimeoutExpired, strict=False,
                   reason="in the full suite the run sometimes did not end within 60 s of two Ctrl-Cs (alone it "
                          "ends in about 3 s). One cause, a worker stopped while it sent its result, is mended and "
                          "tested (test_stopping_workers_ends_after_a_torn_result), but the full suite still timed "
                          "out here once after it: another cause remains, see the issue notes")
def test_two_quick_ctrl_cs_end_in_one_message(tmp_path):
    proc, workers = start_sweep(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        HUNG_RUNS.append(threads_of_a_hung_run(proc))  # printed at the end of the suite: where it waits
        raise
    assert proc.returncode == 130 and "Traceback" not in err and "leaked" not in err, err
    assert [line for line in err.splitlines() if line.strip()][-1].startswith("interrupted: run the same command")
    deadline = time.monotonic() + 30  # as test_workers_end_with_their_parent: ended, if not at the same instant
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(w) for w in workers), [open(f"/proc/{w}/cmdline", "rb").read()[:100] for w in workers
                                                 if alive(w)]


TORN_RESULT = """
import concurrent.futures, multiprocessing, os, signal, struct, sys, time
sys.path.insert(0, {root!r})
from leakage import sweeps

def send_half_a_result_and_die():
    # what a worker stopped half-way through sending a large result leaves in the pipe
    results = next(o for o in __import__("gc").get_objects()
                   if isinstance(o, multiprocessing.queues.SimpleQueue))
    os.write(results._writer.fileno(), struct.pack("!i", 1 << 20) + bytes(64))
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    pool = concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn"))
    pool.submit(send_half_a_result_and_die)
    time.sleep(5)  # the manager thread is now inside recv(), waiting for the rest
    sweeps.stop_workers(pool)
    print("stopped", flush=True)  # and the exit, which joins the pool's manager thread, follows
"""


@pytest.mark.slow
def test_stopping_workers_ends_after_a_torn_result(tmp_path):
    """The cause of a rare hang at Ctrl-C: a worker stopped while it sent its result."""
    script = tmp_path / "torn.py"
    script.write_text(TORN_RESULT.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"hung (said {out.strip()!r})")
    assert proc.returncode == 0 and out.strip() == "stopped" and "leaked" not in err, out + err


@pytest.mark.slow
def test_ctrl_c_while_the_libraries_load_is_quiet():
    proc = subprocess.Popen([sys.executable, str(ROOT / "hybrid.py"), "--list-models"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # torch takes seconds to import
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert "Traceback" not in err and proc.returncode in (130, -signal.SIGINT, 0), err


# -- --analyse handles what the attacks handle ---------------------------------------------


def test_analyse_of_a_diverged_model_is_one_line(monkeypatch, capsys):
    real = client_gradient
    monkeypatch.setattr("leakage.gradients.client_gradient", lambda *a: [g * float("nan") for g in real(*a)])
    assert H.main(["--analyse", "--source", "samples", "--model", "cnn2_c0", "--index", "3"]) == 1
    assert "the client's gradient is not finite" in one_line(capsys.readouterr().err)


def test_analyse_out_of_memory_is_one_line(monkeypatch, capsys):
    def no_memory(*args):
        raise MemoryError()
    monkeypatch.setattr("leakage.experiment.rank_deficiency", no_memory)
    assert H.main(["--analyse", "--source", "samples", "--model", "cnn2_c0", "--index", "3"]) == 1
    assert "out of memory" in one_line(capsys.readouterr().err)


# -- The attacked image is never in the training data --------------------------------------


def test_a_bundled_photograph_given_as_a_file_is_not_trained_on(tmp_path):
    import skimage.data

    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.png")
    (image,) = load_files([str(tmp_path / "cat.png")], 3)
    _, _, described = training_data(image, 10, "data")
    assert "chelsea" not in described and "astronaut" in described


def test_ctrl_c_before_any_folder_names_none(monkeypatch, tmp_path, capsys):
    def interrupted(exp, analysing):
        raise KeyboardInterrupt
    monkeypatch.setattr("leakage.cli.load_images", interrupted)
    assert H.main([*QUICK, "--model", "cnn2_c0", "--output", str(tmp_path)]) == 130
    line = one_line(capsys.readouterr().err)
    assert "nothing was written" in line and "--resume" not in line and not list(tmp_path.iterdir())
