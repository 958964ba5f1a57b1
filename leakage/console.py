"""How the program talks to its user: one-line errors (UserError: exit status 2), lines above
the progress bars, the bars themselves (quiet in a log unless -v), and text made printable."""
from __future__ import annotations

import os
import re
import sys
from typing import Iterable

from tqdm import tqdm


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


def say(text: str = "", end: str = "\n") -> None:
    """A line for the user on stdout, above any progress bar, flushed. A reader that goes
    away (`| head -1`) does not stop the run: the rest goes nowhere, and stderr says so."""
    try:
        tqdm.write(text, end=end)
        sys.stdout.flush()
    except OSError as e:  # a closed pipe, a full device: the run's folder is what matters
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit too
        why = "was closed" if isinstance(e, BrokenPipeError) else f"cannot be written ({e.strerror or e})"
        print(f"stdout {why}; the run goes on and writes its folder as usual", file=sys.stderr)


def warn(text: str) -> None:
    """A line on stderr, above any progress bar: something the user should know, not an error."""
    tqdm.write(f"warning: {text}", file=sys.stderr)


LOG_EVERY_SECONDS = 60.0
_progress_in_logs = False  # set by progress_in_logs, in the parent and in each worker


def progress_in_logs(on: bool) -> None:
    """Where stderr is not a terminal (a SLURM job's log), progress bars print nothing
    unless this is on (-v). Then each bar is a line when it starts, a line at most every
    LOG_EVERY_SECONDS, and a line when it ends: a log shows how far each layer got."""
    global _progress_in_logs
    _progress_in_logs = on


REDRAWS = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")  # a bar's carriage returns, nested bars' cursor moves


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, text: str) -> None:
        line = REDRAWS.sub("", text).rstrip()
        if line:
            self.file.write(line + "\n")

    def flush(self) -> None:
        self.file.flush()


def progress(steps: int | Iterable, desc: str) -> tqdm:
    """A progress bar where stderr is a terminal (tqdm's disable=None); in a log, a line
    now and then with -v (progress_in_logs), and nothing without it."""
    steps = range(steps) if isinstance(steps, int) else steps
    if _progress_in_logs and not sys.stderr.isatty():
        return tqdm(steps, desc=desc, file=_Lines(sys.stderr), mininterval=LOG_EVERY_SECONDS, ascii=True,
                    ncols=100, leave=True)
    return tqdm(steps, desc=desc, leave=False, disable=None, dynamic_ncols=True)


def printable(text: str, limit: int) -> str:
    """`text` with what cannot be shown on one line (control characters, line separators,
    the bytes of a name that is not UTF-8) as '?', cut to `limit` characters."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
