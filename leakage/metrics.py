"""The scores: PSNR and SSIM (scikit-image's) against the target."""
from __future__ import annotations

import math

import numpy as np

# =============================================================================
# Metrics
# =============================================================================


def score(target: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """PSNR (data range 1; the published code's 20 log10(255) on [0, 1] images added
    48.13 dB) and SSIM of HWC images in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    recon = np.nan_to_num(recon, nan=0.5)
    with np.errstate(divide="ignore"):  # an exact reconstruction has infinite PSNR
        psnr = peak_signal_noise_ratio(target, recon, data_range=1)
    return {"psnr": float(psnr),
            "ssim": float(structural_similarity(target, recon, channel_axis=-1, data_range=1))}


def matched(targets: np.ndarray, recons: np.ndarray) -> list[int]:
    """Which reconstruction is which image: order[i] is the reconstruction paired with target
    i, by the assignment of least total squared error (scipy's linear_sum_assignment, as
    breaching and LeakPro pair a batch). Targets and reconstructions (B, H, W, C)."""
    from scipy.optimize import linear_sum_assignment

    recons = np.nan_to_num(recons, nan=0.5)
    cost = ((targets[:, None] - recons[None]) ** 2).reshape(len(targets), len(recons), -1).mean(-1)
    _, order = linear_sum_assignment(cost)
    return [int(j) for j in order]


def inf_to_none(value: float) -> float | None:
    """JSON has no infinity: an exact reconstruction's PSNR is stored as null."""
    return value if math.isfinite(value) else None
