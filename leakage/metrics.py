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


def inf_to_none(value: float) -> float | None:
    """JSON has no infinity: an exact reconstruction's PSNR is stored as null."""
    return value if math.isfinite(value) else None
