"""The same from Python: attack and analyse a gradient computed elsewhere (hybrid.attack, hybrid.analyse)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch
import torch.nn as nn

from leakage.attacks import ATTACKS
from leakage.console import UserError, warn
from leakage.flags import default_of, flags_of
from leakage.experiment import answers
from leakage.gradients import as_captured, captured_gradient, fingerprint, inconsistency, load_gradient
from leakage.models import Net
from leakage.modules import Classifier, NotAChain, logits_shape, read_module
from leakage.data import PUBLISHED_NORMALIZE, normalize_of, sized
from leakage.labels import mean_posterior, recover_labels
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
           attacks: tuple[str, ...] = ("rgap", "hybrid"), label: int | Iterable[int] | None = None,
           batch: int = 1, normalize: tuple = PUBLISHED_NORMALIZE, seed: int = PUBLISHED_SEED,
           **settings: object) -> dict[str, AttackResult]:
    """The attacks on `gradient`, the gradient of one image (or of the mean cross-entropy of a
    batch of `batch` images) shared by `model` as it is now.

    model: your nn.Module (read with torch.fx, as --model PATH.py:NAME is), or a Net.
    gradient: a tensor per parameter in model.parameters() order, a dict of them by
        parameter name, or the path of a file torch.save wrote either to.
    input_shape: (C, H, W) of the model's input.
    attacks: names in ATTACKS; label: the true label, handed to every attack, a batch's B
        labels (None: read from the gradient, iDLG's rule, or a batch's counts); batch: B,
        the images the gradient is the mean over (DLG, iDLG and Cosine+TV take B > 1);
        normalize: (mean, std) of the pixels the model takes, for a batch's label counts;
        seed: set before each attack; settings: fields of AttackSettings
        (hybrid_iters_first=2500, ...), the paper's by default.
    Returns {attack: AttackResult}: .x the reconstructions in the model's input space, of
    shape (B, C, H, W), and .label the label it used (a batch's: a tuple of B, one per
    reconstruction; pair them with your images by metrics.matched). A model, gradient or
    setting the attacks cannot take raises UserError (or TypeError, for a setting that is
    none), naming it."""
    names = [attacks] if isinstance(attacks, str) else list(attacks)  # a generator is read once, here
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        raise UserError(f"attack '{unknown[0]}' is none of {', '.join(ATTACKS)}" if unknown
                        else f"attacks: none named (from {', '.join(ATTACKS)})")
    method = attack_settings(settings)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise UserError(f"batch={batch!r}: expected a whole number of at least 1")
    linear = [name for name in names if ATTACKS[name].linear]
    if batch > 1 and linear:
        raise UserError(f"{', '.join(linear)}: batch={batch}: the linear attacks take one image's gradient "
                        "(dlg, idlg and cosine take a batch's)")
    net, shared = read_inputs(model, gradient, input_shape, names)
    shape = input_shape_of(input_shape)
    normalize = normalize_given(normalize, shape[0])
    used = checked_labels(label, batch, net.classes)
    why = fingerprint(net, shared, batch)
    if why is not None:
        warn(f"the gradient: {why}; attacked as given, as "
             + ("one image's gradient (batch=B for a batch's)" if batch == 1 else f"a batch of {batch}'s"))
    if used is None:
        used = (recover_label(shared, net.bias_at) if batch == 1 else
                recover_labels(shared[net.bias_at], batch, mean_posterior(net, shape, normalize)))
    with own_random_state():
        results = {name: result for _, name, result, _ in answers([(net, shared, used)], names, method, seed)}
    why = next((inconsistency(r.info.get("residual")) for r in results.values() if "residual" in r.info), None)
    if why is not None:
        warn(f"the gradient: {why}")
    return results


def normalize_given(normalize: object, channels: int) -> tuple[tuple, tuple]:
    """normalize=(mean, std), each a number or one per channel, checked as --normalize is."""
    try:
        mean, std = ((float(v),) if isinstance(v, (int, float)) else tuple(map(float, v)) for v in normalize)
    except (TypeError, ValueError):
        raise UserError(f"normalize={normalize!r}: expected (mean, std), each a number or one per channel") from None
    if len(mean) != len(std):
        raise UserError(f"normalize={normalize!r}: give as many means as stds")
    return normalize_of([*mean, *std], channels)


def checked_labels(label: object, batch: int, classes: int) -> int | tuple[int, ...] | None:
    """label= as the attacks take it: None, one int for one image, B of them for a batch; a
    label that is no class, or a count that is not B, one UserError."""
    if label is None:
        return None
    labels = [label] if isinstance(label, (int, np.integer, bool)) else list(label) if isinstance(
        label, Iterable) and not isinstance(label, str) else [label]
    bad = next((v for v in labels if isinstance(v, bool) or not isinstance(v, (int, np.integer))
                or not 0 <= v < classes), None)
    if bad is not None or not labels:
        raise UserError(f"label {(bad if labels else label)!r} is not a class of a model with {classes} "
                        f"(0-{classes - 1})")
    if len(labels) != batch:
        raise UserError(f"label: {len(labels)} given for a batch of {batch}")
    return int(labels[0]) if batch == 1 else tuple(int(v) for v in labels)


def attack_settings(settings: dict[str, object]) -> AttackSettings:
    """AttackSettings from keyword arguments, each checked as its flag checks it (a whole
    number of at least its bound, a bool, one of its choices): one UserError naming it."""
    fields = {f.name: f for f in flags_of(AttackSettings)}
    for name, value in settings.items():
        if name not in fields:
            raise TypeError(f"attack() got an unexpected keyword argument '{name}' (not a field of AttackSettings)")
        f, default = fields[name], default_of(fields[name])
        kind = type(default)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise UserError(f"{name}={value!r}: expected a {kind.__name__}, as {default!r}")
        check, choices = f.metadata["argparse"].get("type"), f.metadata["argparse"].get("choices")
        try:
            if check is not None:
                check(str(value))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{name}={value!r}: {e}") from None
        choices = choices() if callable(choices) else choices
        if choices is not None and value not in choices:
            raise UserError(f"{name}={value!r}: expected one of {', '.join(map(str, choices))}")
    return dataclasses.replace(AttackSettings(), **settings)


@contextlib.contextmanager
def own_random_state() -> Iterator[None]:
    """The attacks seed torch and numpy (seed_everything); the caller's random streams are
    theirs: a training loop that calls attack() every round does not get the same stream
    each round."""
    state = np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        try:
            yield
        finally:
            np.random.set_state(state)


def analyse(model: nn.Module, gradient: list | tuple | dict | str, input_shape: tuple[int, int, int]) -> dict:
    """Each layer's rank deficiency for `gradient` (R-GAP's recursion, no attack), its
    unknowns, and both indices: what --analyse prints, as a dict."""
    net, shared = read_inputs(model, gradient, input_shape)
    deficiency = rank_deficiency(net, shared)
    unknowns = [math.prod(shape) for shape in net.shapes[:-1]]
    return {"rank_deficiency": deficiency, "unknowns": unknowns, "security_index": security_index(deficiency),
            "worst_layer_fraction": worst_layer_fraction(deficiency, unknowns)}


def as_model(module: nn.Module, shape: tuple[int, int, int], attacks: list[str]) -> Net | Classifier:
    """The module as the attacks named take it: its chain (read_module), or the whole module
    (Classifier) where it is none and none of them inverts it layer by layer."""
    where = f"the model ({type(module).__name__})"
    try:
        return read_module(module, shape, where)
    except NotAChain as e:
        linear = [name for name in attacks if ATTACKS[name].linear]
        if linear:
            raise UserError(f"{', '.join(linear)}: {e} (dlg, idlg and cosine take any classifier)") from None
        return Classifier(module, shape, logits_shape(module, shape, where), e.blocking, where)


def input_shape_of(input_shape: Iterable) -> tuple[int, int, int]:
    """(C, H, W) as whole numbers of at least 1, or one UserError naming what was given."""
    try:
        shape = tuple(input_shape)
        ok = len(shape) == 3 and all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
                                     for n in shape)
    except TypeError:
        ok = False
    if not ok:
        raise UserError(f"input_shape {input_shape!r}: expected (C, H, W), three whole numbers of at least 1")
    return sized(tuple(int(n) for n in shape), "input_shape", scored=False)


def read_inputs(model: nn.Module, gradient: list | tuple | dict | str, input_shape: tuple[int, int, int],
                attacks: list[str] = ("rgap",)) -> tuple[Net | Classifier, list[torch.Tensor]]:
    """attack's and analyse's arguments as the attacks take them: the model's chain (its own
    layers, not a copy), or, where it is none and no attack named needs one, the whole
    module; and the gradient matched to its parameters."""
    shape = input_shape_of(input_shape)
    if not isinstance(model, nn.Module):
        raise UserError(f"model: a {type(model).__name__}, not an nn.Module")
    kinds = {p.dtype for p in model.parameters()} | {p.device.type for p in model.parameters()}
    if "meta" in kinds:
        raise UserError("the model's parameters are on the meta device: they hold no values to attack")
    if kinds & {torch.float64, torch.float16, torch.bfloat16}:  # as the command line: in float32, on a copy
        model = copy.deepcopy(model).float()
    net = model if isinstance(model, Net) else as_model(model, shape, attacks)
    if isinstance(gradient, (str, os.PathLike)):
        captured = load_gradient(os.fspath(gradient), shape)
    else:
        captured = as_captured(gradient, "gradient", "the gradient", shape)
    return net, captured_gradient(net, captured)
