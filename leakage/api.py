"""The same from Python: attack and analyse a gradient computed elsewhere (hybrid.attack, hybrid.analyse)."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from leakage.attacks import ATTACKS
from leakage.console import UserError
from leakage.experiment import answers
from leakage.gradients import as_captured, captured_gradient, load_gradient
from leakage.models import Net
from leakage.modules import read_module
from leakage.paper import rank_deficiency, recover_label, security_index, worst_layer_fraction
from leakage.runtime import PUBLISHED_SEED
from leakage.settings import AttackSettings

if TYPE_CHECKING:  # annotations alone
    from leakage.matching import AttackResult

# =============================================================================
# The same from Python: attack and analyse a gradient computed elsewhere
# =============================================================================
#
#     model = MyNet(); ...                      # the client's model, with its weights
#     gradient = [p.grad for p in model.parameters()]   # or {n: p.grad for n, p in ...}
#     results = hybrid.attack(model, gradient, (1, 28, 28), attacks=("rgap", "hybrid"))
#     results["rgap"].x, results["rgap"].label   # (1, C, H, W) in the model's input space
#
# What `--model PATH.py:NAME --weights FILE --gradient FILE` does, by the same functions:
# read_module, captured_gradient, recover_label and each attack's row of ATTACKS.


def attack(model: nn.Module, gradient: list | tuple | dict | str, input_shape: tuple[int, int, int], *,
           attacks: tuple[str, ...] = ("rgap", "hybrid"), label: int | None = None, seed: int = PUBLISHED_SEED,
           **settings: object) -> dict[str, AttackResult]:
    """The attacks on `gradient`, the gradient of one image shared by `model` as it is now.

    model: your nn.Module (read with torch.fx, as --model PATH.py:NAME is), or a Net.
    gradient: a tensor per parameter in model.parameters() order, a dict of them by
        parameter name, or the path of a file torch.save wrote either to.
    input_shape: (C, H, W) of the model's input.
    attacks: names in ATTACKS; label: the true label, handed to every attack (None: read
        from the gradient, iDLG's rule); seed: set before each attack; settings: fields of
        AttackSettings (hybrid_iters_first=2500, ...), the paper's by default.
    Returns {attack: AttackResult}: .x the reconstruction in the model's input space, of
    shape (1, C, H, W), and .label the label it used. A model, gradient or setting the
    attacks cannot take raises UserError (or TypeError, for a setting that is none), naming it."""
    unknown = [name for name in attacks if name not in ATTACKS]
    if unknown:
        raise UserError(f"attack '{unknown[0]}' is none of {', '.join(ATTACKS)}")
    method = AttackSettings(**settings)  # an unknown setting is a TypeError naming it
    net, shared = read_inputs(model, gradient, input_shape)
    used = recover_label(shared) if label is None else int(label)
    return {name: result for _, name, result, _ in answers([(net, shared, used)], list(attacks), method, seed)}


def analyse(model: nn.Module, gradient: list | tuple | dict | str, input_shape: tuple[int, int, int]) -> dict:
    """Each layer's rank deficiency for `gradient` (R-GAP's recursion, no attack), its
    unknowns, and both indices: what --analyse prints, as a dict."""
    net, shared = read_inputs(model, gradient, input_shape)
    deficiency = rank_deficiency(net, shared)
    unknowns = [math.prod(shape) for shape in net.shapes[:-1]]
    return {"rank_deficiency": deficiency, "unknowns": unknowns, "security_index": security_index(deficiency),
            "worst_layer_fraction": worst_layer_fraction(deficiency, unknowns)}


def read_inputs(model: nn.Module, gradient: list | tuple | dict | str,
                input_shape: tuple[int, int, int]) -> tuple[Net, list[torch.Tensor]]:
    """attack's and analyse's arguments as the attacks take them: the model's chain (its own
    layers, not a copy) and the gradient matched to its parameters."""
    shape = tuple(int(n) for n in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"input_shape {tuple(input_shape)}: expected (C, H, W)")
    net = model if isinstance(model, Net) else read_module(model, shape, f"the model ({type(model).__name__})")
    if isinstance(gradient, (str, os.PathLike)):
        captured = load_gradient(os.fspath(gradient), shape)
    else:
        captured = as_captured(gradient, "gradient", "the gradient", shape)
    return net, captured_gradient(net, captured)
