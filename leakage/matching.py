"""What every attack returns, and what gradient matching shares (the hybrid's corrections and the
baselines): the distances between gradients, total variation, a dummy's gradient, the best of R starts."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from leakage.metrics import inf_to_none
from leakage.models import Net

if TYPE_CHECKING:  # annotations alone
    from leakage.settings import AttackSettings

# =============================================================================
# Attacks: one signature (model, shared gradient, label, settings), one result type
# =============================================================================


@dataclass
class AttackResult:
    x: torch.Tensor  # the reconstruction in model space, (B, C, H, W): (1, 3, 32, 32) for one CIFAR image
    label: int | tuple[int, ...]  # the label the attack used or found; a batch's, one per reconstruction
    info: dict = field(default_factory=dict)  # attack-specific numbers for results.json


# Attacks take the model, the shared gradient and a label, never the image (the threat model).
AttackFunction = Callable[[Net, list[torch.Tensor], int, "AttackSettings"], AttackResult]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of (B, C, H, W) as the published code had it: the mean absolute
    difference of horizontal neighbours plus that of vertical ones (over a batch, the mean of
    its images')."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def cosine_distance(dummy: list[torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor:
    """sum_p 1 - cos(dummy_p, shared_p), the tensors flattened (Geiping et al. 2020)."""
    return sum(1 - F.cosine_similarity(d.flatten(), g.flatten(), dim=0, eps=1e-10)
               for d, g in zip(dummy, shared))


def squared_distance(dummy: list[torch.Tensor], shared: list[torch.Tensor]) -> torch.Tensor:
    """sum_p ||dummy_p - shared_p||^2 (Zhu et al. 2019)."""
    return sum((d - g).square().sum() for d, g in zip(dummy, shared))


def dummy_gradient(model: Net, output: torch.Tensor, target: torch.Tensor, start: int = 0) -> list[torch.Tensor]:
    """Gradient of CE(output, target) w.r.t. the parameters of layers start..L-1, kept
    differentiable so that a distance to the shared gradient can be minimised."""
    params = ([p for layer in model.layers[start:] for p in layer.parameters()] if isinstance(model, Net)
              else list(model.parameters()))  # any classifier (modules.Classifier): whole
    return list(torch.autograd.grad(F.cross_entropy(output, target), params, create_graph=True))


def objective_info(first: list[float], last: float) -> dict:
    """The attack's own objective before and after: results.json reports both (null
    where it left the finite numbers)."""
    return {"objective_start": inf_to_none(first[0] if first else last), "objective_end": inf_to_none(last)}


def best_start(start: Callable[[], AttackResult], restarts: int) -> AttackResult:
    """`restarts` runs of an attack from random images, one after another from the
    attack's seed (the first is the paper's single run), keeping the one whose own final
    objective is lowest: an attacker can compute that without the image (breaching's
    `restarts`). DLG's L-BFGS is chaotic (docs/attacks.md), so one start is a lottery ticket.
    A start whose objective left the finite numbers ranks last."""
    starts = [start() for _ in range(restarts)]
    if restarts == 1:
        return starts[0]
    ends = [math.inf if s.info["objective_end"] is None else s.info["objective_end"] for s in starts]
    best = int(np.argmin(ends))
    starts[best].info |= {"best_start": best, "starts": [{"objective_start": s.info["objective_start"],
                                                          "objective_end": s.info["objective_end"],
                                                          "label": s.label} for s in starts]}
    return starts[best]
