"""The machinery of long runs: run folders, the record, resume, shards, worker processes, merge.

hybrid.py runs its experiment on one (model, image) at a time, or on a few images of one
model together; this module runs such cells over a grid for hours and keeps what
finished. It knows nothing of the paper and imports nothing of it: it is handed
a `Sweep` (the cells, how they group into units worked on together, the function that
works on a unit, the one that writes what that yields, cell by cell) and a `Record` (how
results.json keys and tables its entries).

A run folder holds:

    results.json  the record: a header (config, versions, command) and one entry per
                  cell, rewritten atomically after each finished part (an attack, for
                  hybrid.py). What it holds is done.
    results.csv   its table, one row per finished part: appended as parts finish (for
                  `tail -f`), rebuilt from the record on resume and at the end.
    grid.json     every cell of the experiment (all shards) and the parts each needs,
                  written once when the run starts: what resume and merge check against.
    *.npy         the arrays that entries name.
    .lock         held (flock) while a run writes the folder, and removed after.

Each part is written in one order: its arrays, then results.json, then its row. A kill
at any point costs the part in flight at most, and a resume makes the table whole.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import itertools
import json
import multiprocessing
import multiprocessing.connection
import ctypes
import errno
import math
import os
import re
import resource
import shutil
import pickle
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from leakage.console import UserError, printable, progress, say, warn
from leakage.flags import add_settings, at_least, given, path_value, setting


class CellsFailed(Exception):
    """Cells of a sweep that could not be finished: the rest is recorded; --resume retries them."""


class Terminated(BaseException):
    """SIGTERM (a scheduler's time limit): raised in the main thread, so that the run stops
    its workers and says how to resume, as after Ctrl-C. Not an Exception: a cell's error
    handling must not take it for the cell's own."""


def on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def quiet_interrupts() -> None:
    """From the first Ctrl-C (or SIGTERM) on, further ones are ignored while the run stops
    its workers and exits: a second Ctrl-C must not cut the clean-up into a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# =============================================================================
# The run's settings: how a sweep runs, never what it computes
# =============================================================================


# Settings that leave a run's numbers as they are: a resumed run (and the shards of a merge)
# may differ in these. The experiment adds its own (record.may_differ).
RUN_ONLY = frozenset({"output", "resume", "jobs", "threads"})


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def jobs_value(text: str) -> int:
    """N worker processes, or 'auto': one per core this process may run on."""
    if text == "auto":
        return usable_cores()
    try:
        return at_least(1, "a number of workers")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of workers (1 or more) or 'auto', not '{text}'") from None


def shard_value(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]+)/([0-9]+)", text)  # ASCII digits: str.isdigit takes '²', which int() refuses
    if not (match and int(match[1]) < int(match[2])):
        raise argparse.ArgumentTypeError(f"'{text}': expected K/N with 0 <= K < N, e.g. 3/16")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class RunSettings:
    """How a sweep runs, never what it computes."""

    output: str = setting("output", "each run writes a new folder here (default {default})", metavar="DIR",
                          type=path_value)
    resume: str | None = setting(None, "complete this run folder, skipping what it holds", metavar="RUN_FOLDER",
                                 type=path_value)
    shard: tuple[int, int] = setting((0, 1), "run every N-th cell of the grid from the K-th (SLURM job arrays)",
                                     type=shard_value, metavar="K/N")
    jobs: int = setting(1, "worker processes, each on one cell at a time (default {default}); 'auto': one per "
                           "usable core", type=jobs_value, metavar="N|auto")
    threads: int = setting(1, "threads per process for torch and the BLAS libraries (default {default}: processes "
                              "side by side do not fight over cores)", type=at_least(1, "--threads"),
                           metavar="T")


def add_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    """The run's flags (RunSettings', the program's `output` as --output's default) and the
    merge's, in their own group of the --help."""
    g = parser.add_argument_group("long runs (none of these changes a number)")
    add_settings(g, RunSettings, {"output": output})
    g.add_argument("--merge", nargs="+", metavar="FOLDER", type=path_value,
                   help="combine the run folders of shards into one")
    g.add_argument("--partial", action="store_true",
                   help="with --merge: merge what there is when cells of the experiment are missing, and say which")


def run_settings(args: argparse.Namespace, output: str) -> RunSettings:
    """The run's flags, checked: a resumed folder exists, and threads fit the cores. More
    threads than usable cores are refused (they make every step slower: docs/performance.md);
    more workers x threads than cores are
    allowed, with a warning (the scheduler may give the run more cores than it asks for)."""
    run = given(RunSettings, args, output=args.output or output)
    jobs, threads = run.jobs, run.threads
    if args.resume is not None and not Path(args.resume).is_dir():
        raise UserError(f"--resume {args.resume}: no such run folder")
    cores = usable_cores()
    if threads > cores:
        raise UserError(f"--threads {threads}: this process may use {cores} cores; more threads than cores "
                        "make every step slower")
    if jobs * threads > cores:
        warn(f"{jobs} workers x {threads} threads on {cores} usable cores: they will fight over them "
             "(docs/performance.md)")
    return run


# =============================================================================
# What a sweep is handed
# =============================================================================


@dataclass(frozen=True)
class Record:
    """How results.json is laid out: for the run that writes it, and the resume and the
    merge that read it."""

    key: Callable[[dict], tuple[str, ...]]  # an entry -> the cell it records, e.g. (model, image): as cells' .key
    parts: str  # the field of an entry that holds its finished parts, e.g. "attacks"
    columns: tuple[str, ...]  # results.csv's
    row: Callable[[dict, str], dict]  # (entry, part) -> its row of results.csv
    is_entry: Callable[[object], bool]  # an entry as the program writes them, or as an older version wrote it
    upgrade: Callable[[dict], dict]  # results.json as an older version wrote it -> as this one writes it (in place)
    upgrade_key: Callable[[tuple], tuple]  # a grid.json key as an older version wrote it -> as this one names the cell
    defaults: dict  # the config of a run given no flags: a setting newer than a folder counts as this
    may_differ: frozenset[str]  # config keys besides RUN_ONLY that leave numbers alone
    program: str  # what writes such folders, for messages: "hybrid.py"
    cells_are: str  # what a cell is, for messages: "(model, image) pairs"
    files: str = "npy"  # any dict in an entry names an array of the folder under this key
    skipped: str = "skipped"  # the field of an entry naming parts that cannot be done, with why
    # (key, config before, config now) -> a difference in words, or None for 'key old -> new'
    explain: Callable[[str, dict, dict], str | None] = lambda key, before, now: None


@dataclass
class Sweep:
    """An experiment over a grid, as the machinery sees it."""

    record: Record
    name: str  # the run folder's name, after its time
    header: dict  # results.json's header: config, versions, device, command
    cells: list  # every cell of the experiment, in order; each has .key (a tuple of str) and .parts
    left: Callable[[object, dict | None], object | None]  # (cell, its entry) -> what is left of it, or None
    work: Callable[[tuple], Iterator]  # a unit (cells worked on together) -> (cell, event) pairs; picklable: it
    # runs in workers too
    write: Callable[[RunFolder, object, object], None]  # (folder, cell, event), in this process alone
    finish: Callable[[RunFolder], None]  # figures and summaries, at the end of every run and merge
    init_worker: Callable[[], None] = lambda: None  # e.g. the thread settings
    together: Callable[[list], list[tuple]] = lambda cells: [(cell,) for cell in cells]  # the cells left -> units


def key_text(key: tuple) -> str:
    return " on ".join(map(str, key))


# =============================================================================
# Run folders and the record
# =============================================================================


def new_run_folder(output: str, name: str) -> Path:
    """OUTPUT/<time>_<name>[-k]: always a new folder, never an earlier run's."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        Path(output).mkdir(parents=True, exist_ok=True)
        for k in range(1000):
            folder = Path(output) / (f"{stamp}_{name}" + (f"-{k}" if k else ""))
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f"cannot write to output folder {output}: {e.strerror or e}") from None
    raise UserError(f"cannot find a new run folder name in {output}")


def write_atomic(path: Path, text: str) -> None:
    """A reader, a kill or a full disk never leaves half a file: the old one stays until
    the new one is whole on disk."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finite_or_null(value: object, where: str = "", replaced: list | None = None) -> object:
    """`value` with every float that is not finite (JSON has none) as None; the place of
    each one replaced is appended to `replaced` ('a.b[2]')."""
    if isinstance(value, float) and not math.isfinite(value):
        if replaced is not None:
            replaced.append(where)
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v, f"{where}.{k}" if where else str(k), replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v, f"{where}[{i}]", replaced) for i, v in enumerate(value)]
    return value


def write_json(path: Path, data: dict) -> list[str]:
    """Write `data` as JSON atomically, any number that is not finite as null; returns
    where such numbers were (an attack's objective that overflowed, a diverged loss).
    The record is rewritten after every attack: json's C encoder alone where every number
    is finite (the usual case, as RunFolder.finished cleans each part as it lands), the
    slower Python walk of finite_or_null only where not (docs/performance.md)."""
    replaced: list[str] = []
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except ValueError:  # a number that is not finite
        text = json.dumps(finite_or_null(data, "", replaced), indent=1, allow_nan=False)
    write_atomic(path, text)
    return replaced


def csv_text(rows: list[dict], columns: Iterable[str], header: bool = True) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, list(columns), lineterminator="\n", extrasaction="ignore")  # rows may hold more
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class RunFolder:
    """A run folder and its record, as it is written."""

    def __init__(self, path: Path, results: dict, record: Record):
        self.path, self.results, self.record = path, results, record
        self.entries = {self.key_of(e): e for e in results["runs"]}  # results["runs"], by cell

    def key_of(self, entry: dict) -> tuple:
        return self.record.key(entry)

    def entry(self, key: tuple) -> dict | None:
        return self.entries.get(key)

    def add(self, entry: dict) -> dict:
        """A new cell's entry; on disk with its first finished part."""
        self.results["runs"].append(entry)
        self.entries[self.key_of(entry)] = entry
        return entry

    def save_array(self, name: str, array: np.ndarray) -> str:
        """An .npy file. Written through Python's file object, not numpy's own writes, whose
        error on a full disk is "N requested and M written", with no errno."""
        buffer = io.BytesIO()
        np.save(buffer, array)
        with open(self.path / name, "wb") as f:
            f.write(buffer.getbuffer())
        return name

    def finished(self, entry: dict, part: str) -> list[str]:
        """A part of `entry` is done: the record first (from then on it is done), then its
        row. Returns the fields of the part that were not finite numbers (recorded as null)."""
        replaced: list[str] = []
        parts = entry[self.record.parts]
        parts[part] = finite_or_null(parts[part], "", replaced)  # once, here: every later save stays fast
        self.results["peak_memory_mb"] = max(resource.getrusage(who).ru_maxrss // 1024  # workers, once ended
                                             for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        self.save()
        with (self.path / "results.csv").open("a", newline="", encoding="utf-8") as f:
            f.write(csv_text([self.record.row(entry, part)], self.record.columns, header=f.tell() == 0))
            f.flush()
            os.fsync(f.fileno())
        return replaced

    def save(self) -> None:
        write_json(self.path / "results.json", self.results)

    def rows(self) -> list[dict]:
        """Every finished part the record holds, as results.csv's rows."""
        return rows_of(self.results, self.record)

    def write_table(self) -> None:
        write_atomic(self.path / "results.csv", csv_text(self.rows(), self.record.columns))

    def write_text(self, name: str, text: str) -> None:
        write_atomic(self.path / name, text)


def rows_of(results: dict, record: Record) -> list[dict]:
    return [record.row(entry, part) for entry in results["runs"] for part in entry.get(record.parts, {})]


class NotARecord(ValueError):
    """A results.json that the program did not write as it stands; says how, after "its results.json"."""


def read_record(path: Path, record: Record) -> dict:
    """A results.json file, checked (every entry as the program writes it, each cell once)
    and upgraded to this version's form; NotARecord where it is not one, OSError as the
    file system says, ValueError (json's) where it is not JSON."""
    results = json.loads(path.read_text(encoding="utf-8"))
    if not (isinstance(results, dict) and isinstance(results.get("config"), dict)
            and isinstance(results.get("runs"), list) and all(record.is_entry(e) for e in results["runs"])):
        raise NotARecord(f"is not one that {record.program} wrote")
    results = record.upgrade(results)
    twice = next((k for k, n in Counter(record.key(e) for e in results["runs"]).items() if n > 1), None)
    if twice is not None:
        raise NotARecord(f"holds {key_text(twice)} twice; {record.program} writes each of its {record.cells_are} once")
    return results


def read_results(folder: Path, flag: str, record: Record) -> dict:
    """A run folder's results.json, or one line saying why it is not one."""
    try:
        return read_record(folder / "results.json", record)
    except FileNotFoundError:
        raise UserError(f"{flag} {folder}: not a run folder (it holds no results.json)") from None
    except NotADirectoryError:
        raise UserError(f"{flag} {folder}: not a run folder (not a folder)") from None
    except IsADirectoryError:
        raise UserError(f"{flag} {folder}: its results.json is a folder, not a record") from None
    except NotARecord as e:
        raise UserError(f"{flag} {folder}: its results.json {e}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{flag} {folder}: its results.json is not one that {record.program} wrote") from None


def config_differences(before: dict, now: dict, record: Record, also: frozenset = frozenset()) -> list[str]:
    """'name old -> new' for each setting that can change a number where two configs
    disagree. A setting newer than the `before` run counts as its default there."""
    as_json = lambda config: json.loads(json.dumps(config))  # noqa: E731 (tuples as results.json has them)
    before, now = as_json(record.defaults) | before, as_json(now)
    same = RUN_ONLY | record.may_differ | also
    return [record.explain(k, before, now) or f"{k} {before.get(k)!r} -> {v!r}"
            for k, v in now.items() if k not in same and before.get(k) != v]


def write_grid(path: Path, cells: list) -> None:
    write_json(path / "grid.json", {"cells": [{"key": list(c.key), "parts": list(c.parts)} for c in cells]})


def read_grid(path: Path, record: Record) -> dict[tuple, list[str]] | None:
    """A folder's grid: cell -> the parts it needs, each cell named as this version names it;
    None for a folder made before grids were kept."""
    try:
        grid = json.loads((path / "grid.json").read_text(encoding="utf-8"))
        cells = grid["cells"] if "cells" in grid else grid["units"]  # "units" in folders written before #42
        return {record.upgrade_key(tuple(c["key"])): list(c["parts"]) for c in cells}
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path}: its grid.json is damaged") from None


def naming_files(value: object, key: str) -> Iterator[dict]:
    """Every dict within `value` (an entry, or part of one) that names a file under `key`."""
    if isinstance(value, dict):
        if isinstance(value.get(key), str):
            yield value
        for v in value.values():
            yield from naming_files(v, key)
    elif isinstance(value, list):
        for v in value:
            yield from naming_files(v, key)


def file_damaged(path: Path) -> bool:
    """Gone, truncated or not an array. Memory-mapped: numpy reads the header and checks
    the size against it, not the data."""
    try:
        np.load(path, mmap_mode="r")
        return False
    except (OSError, ValueError, EOFError):
        return True


def damaged_files(path: Path, entry: dict, record: Record) -> tuple[list[str], dict[str, list[str]]]:
    """The arrays an entry names that are missing or unreadable: those named outside its
    parts (the cell's own, e.g. its target), and those of each part."""
    bad = lambda value: [d[record.files] for d in naming_files(value, record.files)  # noqa: E731
                         if file_damaged(path / d[record.files])]
    own = bad({k: v for k, v in entry.items() if k != record.parts})
    parts = {part: names for part, e in entry.get(record.parts, {}).items() if (names := bad(e))}
    return own, parts


def check_resumable(sweep: Sweep, path: Path) -> tuple[dict, dict | None]:
    """The folder's record and grid (None for an older folder), once it is known to hold
    this experiment: the same config in all that can change a number, and the same cells
    (compared by their keys, so that image files spelled from another directory are the
    same files)."""
    old = read_results(path, "--resume", sweep.record)
    differ = config_differences(old["config"], sweep.header["config"], sweep.record)
    if differ:
        raise UserError(f"--resume {path}: it holds another experiment ({'; '.join(differ)}); "
                        f"its command was: {old.get('command')}")
    cells, recorded = {u.key for u in sweep.cells}, read_grid(path, sweep.record)
    held = [*(recorded or {}), *(sweep.record.key(e) for e in old["runs"])]  # the grid's and the record's own
    strangers = [key_text(key) for key in dict.fromkeys(held) if key not in cells]
    if strangers:  # the same command, other inputs: a file changed since (its hash), or an older program's names
        raise UserError(f"--resume {path}: it holds inputs that this command does not name ({', '.join(strangers[:3])}"
                        f"{', ...' if len(strangers) > 3 else ''}); was an image file changed since?")
    return old, recorded


def open_folder(sweep: Sweep, path: Path, resume: bool) -> RunFolder:
    """A new run's folder, its header and grid written at once (so that it records its
    config and shard from the start); or, with --resume, the folder's own record, checked
    again under the lock, with what its damaged arrays held dropped (to be done again)
    and its table rebuilt."""
    if not resume:
        write_grid(path, sweep.cells)
        write_json(path / "results.json", sweep.header | {"runs": []})
        return RunFolder(path, sweep.header | {"runs": []}, sweep.record)
    old, grid = check_resumable(sweep, path)
    old.pop("missing", None)  # a partial merge's: what this run does not finish, it reports itself
    folder = RunFolder(path, old | {"resumed": old.get("resumed", []) + [sweep.header["command"]]}, sweep.record)
    for key, entry in list(folder.entries.items()):
        own, parts = damaged_files(path, entry, sweep.record)
        for name in own:
            warn(f"{name} is missing or damaged: {key_text(key)} is done again from the start")
        for part, names in parts.items():
            warn(f"{names[0]} is missing or damaged: {part} on {key_text(key)} is done again")
        if own:
            folder.results["runs"].remove(entry)
            del folder.entries[key]
        for part in parts:
            del entry[sweep.record.parts][part]
    if grid is None:  # an older folder: from now on it has one
        write_grid(path, sweep.cells)
    folder.save()
    folder.write_table()
    return folder


class FolderLock:
    """A lock on a run folder (flock on its .lock) until closed: exclusive while a run
    writes the folder, shared while a merge reads it. Two runs (two --resume of one folder)
    never write one folder, a merge never takes half of a running shard, and merges,
    which only read, never refuse each other.

    The last holder removes .lock, so that a finished folder holds only its results. A
    lock is taken only on the file that is at .lock's path once it is held (its inode
    checked): a process that opened the file just before it was removed locks nothing
    that counts, and tries again."""

    ATTEMPTS = 5

    def __init__(self, folder: Path, shared: bool = False) -> None:
        self.path, self.handle = folder / ".lock", None
        for _ in range(self.ATTEMPTS):
            try:
                handle = self.path.open("a")
            except OSError as e:  # a read-only file system, a folder not ours: resuming cannot help
                raise UserError(f"cannot write to run folder {folder}: {e.strerror or e}") from None
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as e:
                held_here = self.is_at_path(handle)
                handle.close()
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock run folder {folder}: {e.strerror or e}") from None
                if held_here:
                    by = "another run" if shared else "another run, or read by a merge"
                    raise UserError(f"{folder} is being written by {by} (its .lock is held)") from None
                time.sleep(0.05)  # held by a holder that was removing it: once more, on the new file
                continue
            if self.is_at_path(handle):
                self.handle = handle
                return
            handle.close()  # removed by its last holder after we opened it
        raise UserError(f"cannot lock run folder {folder}: its .lock keeps being replaced")

    def is_at_path(self, handle: io.TextIOWrapper) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            return False

    def close(self) -> None:
        """Release the lock; the last holder (the one that can hold it alone) removes .lock."""
        if self.handle is None:
            return
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a merge's shared lock: alone?
            if self.is_at_path(self.handle):
                self.path.unlink()
        except OSError:  # another holder: it removes it; a read-only folder keeps it
            pass
        self.handle.close()
        self.handle = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# =============================================================================
# A sweep: this shard's cells, less what the folder holds, here or in workers
# =============================================================================


def run(sweep: Sweep, settings: RunSettings) -> None:
    """Every cell of this shard, every part not yet recorded in the folder (a new one, or
    --resume's); then the experiment's figures and summaries. Raises CellsFailed naming
    the cells it lost. Whatever it raises carries the folder as `run_folder`."""
    path = Path(settings.resume) if settings.resume else None
    try:
        if path is not None:
            check_resumable(sweep, path)  # before the lock: a refusal says why, whatever the file system
        else:
            path = new_run_folder(settings.output, sweep.name)
        with FolderLock(path):  # released however the sweep ends, not when an exception's frames are collected
            folder = open_folder(sweep, path, settings.resume is not None)
            say(f"run folder: {path}")
            k, n = settings.shard
            cells = [left for cell in sweep.cells[k::n] if (left := sweep.left(cell, folder.entry(cell.key)))]
            units = shared_out(sweep.together(cells), settings.jobs)
            record = lambda cell, event: sweep.write(folder, cell, event)  # noqa: E731
            with stretch(folder, sweep.header):
                if settings.jobs == 1:
                    failed = in_this_process(units, sweep.work, record)
                else:
                    failed = in_workers(units, sweep.work, record, settings.jobs, sweep.init_worker)
            # a unit's error costs the cells it left unfinished, not those it recorded whole
            failed = {u.key: failed[u.key] for u in cells if u.key in failed and sweep.left(u, folder.entry(u.key))}
            folder.write_table()
            sweep.finish(folder)
        if failed:
            raise CellsFailed("; ".join(f"{key_text(key)}: {why}" for key, why in failed.items()))
    except BaseException as e:
        e.run_folder = path
        raise


@contextlib.contextmanager
def stretch(folder: RunFolder, header: dict) -> Iterator[None]:
    """One stretch of a run (its start, or a --resume) in the record's `stretches`: when it
    began and ended, its wall seconds, the parts it finished, and the header's `commit` (the
    code that ran it). Written at the end however the stretch ends, as far as the disk allows."""
    parts = lambda: sum(len(e.get(folder.record.parts, {})) for e in folder.results["runs"])  # noqa: E731
    before, start = parts(), time.time()
    entry = {"commit": header.get("commit"), "command": header.get("command"),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(start))}
    try:
        yield
    finally:
        folder.results.setdefault("stretches", []).append(
            entry | {"ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - start, 1),
                     "parts_done": parts() - before})
        try:
            folder.save()
        except OSError:  # a full disk: what was finished is on disk already; the stretch's times are lost
            pass


def reason(error: BaseException) -> str:
    """Why a cell failed, in one phrase."""
    if isinstance(error, MemoryError):
        return "out of memory"
    return f"{type(error).__name__}: {error}"


def shared_out(units: list[tuple], jobs: int) -> list[tuple]:
    """Units split, largest first, until there are twice as many as workers or none holds
    more than one cell: a grid smaller than the workers times --batch-images would otherwise
    leave workers idle (one model's 4 images, one unit, on one of two workers). A cell's
    numbers do not depend on the cells it is worked with (the hybrid's, equal to the bit
    at any --batch-images), so this moves time alone."""
    units = list(units)
    while jobs > 1 and len(units) < 2 * jobs and max(map(len, units), default=1) > 1:
        largest = max(range(len(units)), key=lambda i: len(units[i]))
        unit = units.pop(largest)
        half = (len(unit) + 1) // 2
        units[largest:largest] = [unit[:half], unit[half:]]
    return units


def in_this_process(units: list[tuple], work: Callable, record: Callable) -> dict[tuple, str]:
    """The units one after another, each event recorded as it comes. As in the workers,
    an error in a unit's work costs that unit alone (its cells returned with the reason);
    the recording's own errors (a full disk) stop the run."""
    failed = {}
    for unit in progress(units, "sweep") if len(units) > 1 else units:
        events = work(unit)
        while True:  # not a for loop: an error of `record` must not be taken for the unit's
            try:
                cell, event = next(events)
            except StopIteration:
                break
            except Exception as e:
                failed |= dict.fromkeys((cell.key for cell in unit), reason(e))
                break
            record(cell, event)
    return failed


# -- --jobs N: cells in worker processes; the parent alone writes the folder ---------------
# concurrent.futures with spawned workers. A cell's numbers must not depend on the worker
# that ran it (hybrid.py reseeds every attack).

_started = None  # in a worker: the pipe on which it announces each unit it starts and each event it ends
_spool = None  # in a worker: the parent's private folder, where each event waits for the parent to record it
_sent = itertools.count()  # in a worker: its events, numbered across its units (each file's name is new)


def start_worker(init: Callable[[], None], started: multiprocessing.connection.Connection, parent: int,
                 spool: str) -> None:
    """A worker's first steps: it ends with its parent, however the parent ends (Linux's
    PR_SET_PDEATHSIG; a SIGKILLed parent runs no clean-up), and leaves Ctrl-C to it."""
    global _started, _spool
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    # tqdm's default lock is a multiprocessing one, registered with the resource tracker; a
    # worker stopped by the parent never releases it ("leaked semaphore" at exit). A worker
    # needs no lock across processes for its own bars.
    tqdm.set_lock(threading.RLock())
    _started, _spool = started, spool
    init()


def work_in_worker(work: Callable, unit: tuple) -> int:
    """A unit's events, each handed to the parent as it comes (so that a unit stopped part-way
    keeps what it finished): pickled into the parent's private spool folder, then named on
    the pipe. Pipe messages stay a few bytes: one write, whole, among the other workers'."""
    _started.send(("started", [cell.key for cell in unit]))
    count = 0
    for cell, event in work(unit):
        path = os.path.join(_spool, f"{os.getpid()}-{next(_sent)}")  # not yet read, maybe: never reused
        with open(path + ".part", "wb") as f:
            pickle.dump((cell, event), f, pickle.HIGHEST_PROTOCOL)
        os.replace(path + ".part", path)
        _started.send(("event", path))
        count += 1
    return count


def take_events(announced: multiprocessing.connection.Connection, running: set, record: Callable) -> None:
    """What the workers announced: the units they started, and each event they finished,
    recorded now and removed from the spool (written there by our own workers only)."""
    while announced.poll():
        kind, value = announced.recv()
        if kind == "started":
            running.update(map(tuple, value))
            continue
        with open(value, "rb") as f:
            cell, event = pickle.load(f)
        os.unlink(value)
        record(cell, event)  # the parent's own errors (a full disk) stop the run


def in_workers(units: list[tuple], work: Callable, record: Callable, jobs: int,
               init: Callable[[], None]) -> dict[tuple, str]:
    """The units in `jobs` workers, each recorded by the parent as it comes back.

    A worker that dies (killed, out of memory) breaks concurrent.futures' pool and every
    unit then in flight; those run again one at a time, whole (so that their numbers are
    those of an unbroken run), and a unit that kills its worker alone, cell by cell: only
    a cell that kills its worker on its own is lost. Returns the cells lost, with the reason.
    """
    failed, queue, suspects = {}, list(units), []
    while queue or suspects:
        if suspects:
            unit = suspects.pop(0)
            in_flight, not_started = one_pool([unit], work, record, 1, init, failed)
            if (in_flight or not_started) and len(unit) > 1:
                suspects = [(cell,) for cell in unit] + suspects
            else:
                failed |= {cell.key: "its worker died (killed, or out of memory?)" for u in in_flight + not_started
                           for cell in u}
        else:
            suspects, queue = one_pool(queue, work, record, jobs, init, failed)
            if queue and not suspects:  # a worker died before it could say which unit it ran
                suspects, queue = queue, []
    return failed


def one_pool(units: list[tuple], work: Callable, record: Callable, jobs: int, init: Callable[[], None],
             failed: dict) -> tuple[list, list]:
    """Run units in a pool of `jobs` workers until all are back or a worker dies; then
    return the units in flight and those not started (both empty if none died)."""
    spawn = multiprocessing.get_context("spawn")
    # A pipe, not a multiprocessing queue: its semaphores would outlive a Ctrl-C ("leaked semaphore")
    announced, started = spawn.Pipe(duplex=False)
    spool = tempfile.mkdtemp(prefix="hybrid-events-")  # 0700: this process's and its workers' alone
    pool = ProcessPoolExecutor(jobs, spawn, start_worker, (init, started, os.getpid(), spool))
    futures, running, finished = {pool.submit(work_in_worker, work, u): u for u in units}, set(), set()
    bar = progress(sum(map(len, units)), "pairs")
    begun = lambda unit: unit[0].key in running  # noqa: E731
    try:
        while futures.keys() - finished:
            done, _ = wait(futures.keys() - finished, timeout=2, return_when=FIRST_COMPLETED)
            take_events(announced, running, record)  # a done unit's events were all sent before it returned
            for future in done:
                unit = futures[future]
                try:
                    future.result()
                except BrokenProcessPool:
                    return ([u for f, u in futures.items() if f not in finished and begun(u)],
                            [u for f, u in futures.items() if f not in finished and not begun(u)])
                except Exception as e:  # a bug on one unit: the others go on (its recorded events stay)
                    failed |= dict.fromkeys((cell.key for cell in unit), f"{type(e).__name__}: {e}")
                finished.add(future)
                bar.update(len(unit))
            running_now = sorted(running - {cell.key for f in finished for cell in futures[f]})
            bar.set_postfix_str(", ".join(" ".join(k) for k in running_now), refresh=False)
        pool.shutdown()
        return [], []
    except BaseException:  # Ctrl-C, SIGTERM, the parent's own error: no second one while the workers stop
        quiet_interrupts()
        raise
    finally:
        stop_workers(pool)
        announced.close()
        started.close()
        shutil.rmtree(spool, ignore_errors=True)
        del pool  # this frame outlives the function in a traceback: the pool's queues must not


WORKER_GRACE_SECONDS = 5.0  # after SIGTERM; then SIGKILL


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Workers end with the pool; on Ctrl-C or a failure they are stopped, not awaited
    for their cells. A worker inside a long library call (a least-squares solve) handles
    SIGTERM only when the call returns, which can take a minute, so after a grace period
    it is killed: workers write nothing, the parent records every cell. The pool's own
    manager thread is then joined, so that its queues (and their semaphores) are released
    before the process exits, not reported as leaked."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # private, but no public way before 3.14
    manager = getattr(pool, "_executor_manager_thread", None)  # private too, and like the next
    results = getattr(pool, "_result_queue", None)  # forgotten by shutdown
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + WORKER_GRACE_SECONDS
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    # A worker stopped half-way through sending a result leaves a torn message in the
    # result pipe, and the pool's manager thread then waits in recv() for the rest: for
    # ever, since this process holds the pipe's write end too (CPython's executor never
    # writes there), and the interpreter's exit, which joins that thread, hangs. With
    # every worker gone, closing that copy turns the torn message into end-of-file, which
    # the manager handles as a broken pool.
    if results is not None:
        results._writer.close()
    if manager is not None:
        manager.join()
    pool.shutdown(wait=True)


# =============================================================================
# Merge: the folders of shards, one record
# =============================================================================


def merge(folders: list[str], record: Record, output: str, finish: Callable[[RunFolder], None],
          partial: bool = False) -> Path:
    """Shard folders -> one new folder with every part once, and the experiment's summary.

    A folder given twice counts once; the folders must hold one experiment (their configs
    may differ in the shard and in what leaves numbers alone, their grids not at all), and
    together every cell of its grid, unless `partial` (the record then lists what is
    missing). A shard left with no work adds nothing; a folder being written (its lock
    held) or one whose arrays are damaged is refused. Everything is checked before the new
    folder is made, which a failure removes again; arrays stay where they are, named
    relative to the new folder.
    """
    sources = list(dict.fromkeys(Path(f).resolve() for f in folders))
    with contextlib.ExitStack() as locks:
        shards = []
        for src in sources:
            read_results(src, "--merge", record)  # a folder that is not a run gets no .lock
            locks.enter_context(FolderLock(src, shared=True))
            shards.append(read_results(src, "--merge", record))  # as it is under the lock
        grid = check_mergeable(sources, shards, record, partial)
        entries: dict[tuple, dict] = {}
        for src, shard in zip(sources, shards):
            for entry in shard["runs"]:
                kept = entries.setdefault(record.key(entry), entry | {"source": src})
                for field in (record.parts, record.skipped):  # overlapping folders: each part once
                    kept.setdefault(field, {}).update({p: e for p, e in entry.get(field, {}).items()
                                                       if p not in kept[field]})
        done = lambda e: set(e.get(record.parts, {})) | set(e.get(record.skipped, {}))  # noqa: E731
        missing = [k for k, parts in (grid or {}).items() if k not in entries or not set(parts) <= done(entries[k])]
        if missing and not partial:
            raise UserError(f"--merge: {len(missing)} of the experiment's {len(grid)} {record.cells_are} are missing "
                            f"({', '.join(key_text(k) for k in missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                            "--partial merges what there is")
        path = new_run_folder(output, "merged")
        try:
            for entry in entries.values():
                rebase(entry, entry.pop("source"), path, record.files)
            # the experiment's header (config, versions, command), not a shard's state: the merge
            # holds the whole grid (shard 0/1), and what it lacks, merged or resumed is its own
            header = {k: v for k, v in shards[0].items() if k not in FOLDER_STATE}
            header["config"] = header["config"] | {"shard": [0, 1]}
            stretches = [t for shard in shards for t in shard.get("stretches", [])]  # each shard's wall times
            folder = RunFolder(path, header | {"merged": [str(s) for s in sources], "runs": list(entries.values()),
                                               "stretches": stretches}, record)
            if missing:
                folder.results["missing"] = [list(k) for k in missing]
            if grid is not None:
                shutil.copyfile(sources[0] / "grid.json", path / "grid.json")  # a merge can be merged again
            folder.save()
            folder.write_table()
            finish(folder)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)  # it holds nothing of its own: the arrays are the shards'
            raise
    return path


FOLDER_STATE = ("runs", "missing", "merged", "resumed", "stretches", "correlations", "correlations_by_defence",
                "peak_memory_mb")


def check_mergeable(sources: list[Path], shards: list[dict], record: Record, partial: bool) -> dict | None:
    """The shards' common grid, once they are known to hold one experiment whose arrays
    are all readable; None where a folder predates grids and `partial` allows that."""
    base = shards[0]["config"]
    for src, shard in zip(sources[1:], shards[1:]):
        differ = config_differences(base, shard["config"], record, frozenset({"shard"}))
        if differ:
            raise UserError(f"--merge: {src} holds another experiment than {sources[0]} ({'; '.join(differ)})")
    grids = [read_grid(src, record) for src in sources]
    if None in grids and not partial:
        src = sources[grids.index(None)]
        raise UserError(f"--merge: {src} holds no grid.json (an older folder), so the merge cannot be checked to be "
                        "complete; --partial merges what there is")
    known = [g for g in grids if g is not None]
    if any(g != known[0] for g in known[1:]):
        raise UserError(f"--merge: the folders hold different grids of {record.cells_are}: not one experiment")
    for src, shard in zip(sources, shards):
        for entry in shard["runs"]:
            own, parts = damaged_files(src, entry, record)
            bad = own + [n for names in parts.values() for n in names]
            if bad:
                raise UserError(f"--merge: {src / bad[0]} is missing or damaged; --resume {src} with its command "
                                "redoes it")
    return known[0] if known else None


def rebase(entry: dict, src: Path, path: Path, key: str) -> None:
    """Every file an entry names (under `key`), from folder `src`, as a path relative to `path`."""
    for named in naming_files(entry, key):
        named[key] = os.path.relpath(src / named[key], path)


# =============================================================================
# How a run that stopped says so
# =============================================================================


def stopped(error: BaseException, name: str) -> int:
    """One line on stderr for what stopped a run, and its exit status: 2 for the user's
    mistakes, 1 for cells lost or a full disk, 130 for Ctrl-C, 143 for SIGTERM. What
    finished stays, and the line names the folder that --resume completes. `name`: the
    program's."""
    folder = getattr(error, "run_folder", None)
    resumable = folder is not None and (folder / "results.json").exists()
    if isinstance(error, UserError):
        print(f"{name}: error: {printable(str(error), 4000)}", file=sys.stderr)  # one line, whatever a path holds
        return 2
    if isinstance(error, CellsFailed):
        print(f"{name}: not finished, the rest is recorded: {printable(str(error), 4000)}; "
              f"--resume {folder} retries them", file=sys.stderr)
        return 1
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        quiet_interrupts()
        what = "interrupted" if isinstance(error, KeyboardInterrupt) else "terminated"
        if resumable:
            print(f"{what}: run the same command with --resume {folder} to finish", file=sys.stderr)
        else:
            print(f"{what} before a run folder was made: nothing was written", file=sys.stderr)
        return 130 if isinstance(error, KeyboardInterrupt) else 128 + signal.SIGTERM
    if isinstance(error, OSError):  # a full disk, a folder taken away: what was recorded stays
        where = f"; what it finished is in {folder}: the same command with --resume {folder} completes it" \
            if resumable else ""
        print(f"{name}: stopped: {error.strerror or error}{f' ({error.filename})' if error.filename else ''}{where}",
              file=sys.stderr)
        return 1
    raise error
