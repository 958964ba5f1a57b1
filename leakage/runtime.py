"""How a process runs: the one seeding helper, torch's threads and kernels, and the commit a record states."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from leakage import console

# -----------------------------------------------------------------------------

PUBLISHED_SEED = 10  # the published code set torch's and numpy's seeds to 10


def seed_everything(seed: int) -> None:
    """The one seeding helper: models are built and every attack starts after it."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def configure_process(device: str, threads: int, verbose: bool) -> None:
    """Per process (the run's and each worker's): torch's threads and kernels, and with -v
    progress lines in logs."""
    configure_torch(device, threads)
    console.progress_in_logs(verbose)


def configure_torch(device: str, threads: int) -> None:
    """Per process: `threads` threads for torch and the BLAS libraries, since batch-1 attack
    loops gain nothing from a second thread and processes side by side fight over cores
    (docs/performance.md); PyTorch's own CPU convolutions."""
    torch.set_num_threads(threads)
    threadpool_limits(threads)  # OpenBLAS of numpy and scipy (the pivoted QR of the solves)
    if device == "cpu":  # oneDNN's convolutions lose to PyTorch's own on the batch-1
        torch.backends.mkldnn.enabled = False  # double backward (docs/performance.md)


def code_commit() -> str | None:
    """`git describe --always --dirty` of the checkout this file runs from (each stretch of a
    run records it); None outside a git checkout, or without git."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
