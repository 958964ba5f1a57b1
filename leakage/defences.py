"""Defences: what the client does to its gradient before it shares it (DEFENCES, one row per kind)."""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from leakage.console import UserError, printable, say
from leakage.models import by_layer

if TYPE_CHECKING:  # annotations alone
    from leakage.models import Net

# =============================================================================
# Defences: what the client does to its gradient before it shares it
# =============================================================================
# The two standard single-gradient defences of the literature: additive Gaussian noise,
# with DP-SGD's clip-and-noise (Abadi et al., 2016) as its principled form, and pruning
# the entries of smallest magnitude (Zhu et al., 2019, Sec. 5; GradAttack's GradPrune).
# The client applies one to the whole gradient; every attack sees only what comes out.
#
# An attacker who sees pruning's zeros knows they are missing entries, not gradients that
# happen to be 0: R-GAP and the hybrid drop those equations (AttackSettings.zeros_are_missing),
# so each layer's rank deficiency, and the security index, can be computed under the
# defence before any attack. DLG, iDLG and Cosine+TV run unchanged, as in the literature.

class Param(NamedTuple):
    """A defence's parameter: its name in the record, its letter in a spec, its range, and
    how its canonical spelling writes it."""

    name: str
    letter: str  # as the usage writes it: noise:SIGMA
    valid: Callable[[float], bool]  # on a finite number
    rule: str  # what `valid` asks, for the refusal
    scientific: bool = False  # below 1 written 1e-4, 3e-2 (a noise level spans decades); else a decimal, 0.5

    def spelled(self, value: float) -> str:
        """The value's one spelling in a canonical spec."""
        if self.scientific and 0 < value < 1:
            mantissa, exponent = f"{value:.12e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return np.format_float_positional(value, trim="-")


@dataclass(frozen=True)
class DefenceKind:
    """One row of DEFENCES: all that the program knows of a kind of defence. Its order in
    DEFENCES is the figures' and tables' order."""

    params: tuple[Param, ...]
    apply: Callable[[list[torch.Tensor], dict[str, float], int], list[torch.Tensor]]  # (grads, params, seed)
    strength: Callable[[dict[str, float]], float]  # the figures' x for these parameters (none: 0)
    axis: str  # what that strength is, for the figures' axis ("" for none, which sits at 0 on every panel)
    symbol: str  # the strength's symbol, for the tables' headers
    what: str  # what it does, for --help
    seeded: bool = False  # draws noise from the seed (recorded)
    removes_equations: bool = False  # the shared zeros are missing entries, not equations (pruning)
    curve: tuple[str, ...] = ()  # the parameters held fixed along one curve of the figures (dp: its clip C)
    max_strength: float = math.inf  # beyond it the shared gradient would leave what float32 holds

    def usage(self, kind: str) -> str:
        return ":".join([kind, *(p.letter for p in self.params)])


NON_NEGATIVE = lambda v: v >= 0  # noqa: E731
# float32 holds up to 3.4e38: noise of a larger std, times a draw of a few units, overflows to
# inf in the shared gradient, and every solve and objective after it fails.
MAX_NOISE = 1e30


def add_noise(grads: list[torch.Tensor], sigma: float, seed: int) -> list[torch.Tensor]:
    """N(0, sigma^2) in every entry, from the CPU's generator: the same noise on any device,
    and the attacks' seeding untouched."""
    draw = torch.Generator().manual_seed(seed)
    return [g + sigma * torch.randn(g.shape, generator=draw, dtype=g.dtype).to(g.device) for g in grads]


def clip_then_noise(grads: list[torch.Tensor], p: dict[str, float], seed: int) -> list[torch.Tensor]:
    """DP-SGD's step for one example: clip the whole gradient to norm C, then add N(0, (Z C)^2)."""
    clipped = [g * min(1.0, p["clip"] / global_norm(grads)) for g in grads]
    return add_noise(clipped, p["noise_multiplier"] * p["clip"], seed)


DEFENCES: dict[str, DefenceKind] = {
    "none": DefenceKind((), lambda grads, p, seed: grads, lambda p: 0.0, "", "", "the default: the gradient itself"),
    "noise": DefenceKind((Param("sigma", "SIGMA", NON_NEGATIVE, "a finite number of at least 0", scientific=True),),
                         lambda grads, p, seed: add_noise(grads, p["sigma"], seed), lambda p: p["sigma"],
                         "the noise's standard deviation SIGMA", "SIGMA", "adds N(0, SIGMA^2) to every entry",
                         seeded=True, max_strength=MAX_NOISE),
    "prune": DefenceKind((Param("fraction", "P", lambda v: 0 <= v < 1, "in [0, 1)"),),
                         lambda grads, p, seed: [prune_smallest(g, p["fraction"]) for g in grads],
                         lambda p: p["fraction"], "the pruned fraction P", "P",
                         "zeroes the fraction P of each tensor's entries of smallest magnitude",
                         removes_equations=True),
    "dp": DefenceKind((Param("clip", "C", lambda v: v > 0, "a finite number above 0"),
                       Param("noise_multiplier", "Z", NON_NEGATIVE, "a finite number of at least 0")),
                      clip_then_noise, lambda p: p["noise_multiplier"] * p["clip"],
                      "the noise's standard deviation Z C", "Z C",
                      "DP-SGD: clips the whole gradient to norm C, then adds N(0, (Z C)^2)", seeded=True,
                      curve=("clip",), max_strength=MAX_NOISE),
}


def defence_usage() -> str:
    """'none, noise:SIGMA, dp:C:Z or prune:P', from DEFENCES."""
    *others, last = [kind.usage(name) for name, kind in DEFENCES.items()]
    return f"{', '.join(others)} or {last}"


class Defence(NamedTuple):
    """A defence as a spec gives it."""

    spec: str  # as given on the command line, e.g. "prune:0.9": the record's name for it
    kind: str  # a key of DEFENCES
    params: dict[str, float]  # its Params' names -> values

    @property
    def removes_equations(self) -> bool:
        return DEFENCES[self.kind].removes_equations

    @property
    def strength(self) -> float:
        return DEFENCES[self.kind].strength(self.params)


NO_DEFENCE = Defence("none", "none", {})


@functools.cache  # rows and figure points each ask again
def parse_defence(text: str) -> Defence:
    """KIND:VALUE:... as DEFENCES declares it; anything else is one line (UserError)."""
    kind, *values = text.split(":")
    if kind not in DEFENCES:
        raise UserError(f"--defence '{text}': unknown kind '{kind}' (expected {defence_usage()})")
    params = DEFENCES[kind].params
    if len(values) != len(params):
        form = ":".join([kind, *(p.name.upper() for p in params)])
        raise UserError(f"--defence '{text}': expected {form}")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise UserError(f"--defence '{text}': '{':'.join(values)}' is not a number") from None
    for param, value in zip(params, numbers):
        if not (math.isfinite(value) and param.valid(value)):
            raise UserError(f"--defence '{text}': {param.name} must be {param.rule}, not {value:g}")
    values = {p.name: v for p, v in zip(params, numbers)}
    strength = DEFENCES[kind].strength(values)
    if not strength <= DEFENCES[kind].max_strength:
        raise UserError(f"--defence '{text}': {DEFENCES[kind].axis} is {strength:g}, beyond the "
                        f"{DEFENCES[kind].max_strength:g} above which the shared gradient leaves what float32 holds")
    spec = ":".join([kind, *(p.spelled(v) for p, v in zip(params, numbers))])  # noise:0.01 and noise:1e-2 are one
    return Defence(spec, kind, values)


def defence_seed(seed: int, image: str) -> int:
    """The noise's seed for one image: from the run's --seed, so the same command gives the
    same noise and another seed another. Every noise level scales the same draw (common
    random numbers: a curve over SIGMA is not also a curve over draws)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image}".encode()).digest()[:4], "little")


def global_norm(grads: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum(g.double().square().sum() for g in grads)))


def prune_smallest(g: torch.Tensor, fraction: float) -> torch.Tensor:
    """g with floor(fraction * n) of its n entries, those of smallest magnitude, set to 0
    (ties broken by position: the earlier entry goes first)."""
    k = math.floor(fraction * g.numel())
    order = torch.sort(g.abs().flatten(), stable=True).indices
    out = g.flatten().clone()
    out[order[:k]] = 0
    return out.view_as(g)


# DP-SGD on a batch clips each image's gradient, not the mean's (Abadi et al., 2016): Opacus
# computes the per-sample gradients (GradSampleModule) and clips them (DPOptimizer, its
# clip factor C / (norm + 1e-6), capped at 1), and the noise N(0, (Z C)^2) on their sum is
# add_noise's, divided by B with the sum: the same draws as the gradient-level dp above, so
# that one image (B = 1) is that step, up to Opacus's 1e-6 in the clip factor (at most 2.4e-7
# apart on cnn2_c1, cnn4_c2, cnn3_c3, lenet and cnn6d at every committed dp setting; a test).
# One image keeps the gradient-level step, so that every committed run remakes to the bit. The privacy
# this buys is Opacus's RDP accountant's epsilon for one step at delta 1e-5, the client's
# batch taken as its data (sampling rate 1: one FedSGD round).
DELTA = 1e-5


def private_gradient(model: nn.Module, x: torch.Tensor, labels: list[int], defence: Defence,
                     seed: int) -> tuple[list[torch.Tensor], dict]:
    """dp:C:Z on the batch x as DP-SGD defines it (above): the shared gradient, and its record
    (defend's, with Opacus's epsilon)."""
    import copy
    import warnings

    from opacus import GradSampleModule
    from opacus.accountants import RDPAccountant
    from opacus.optimizers import DPOptimizer

    clip, z = defence.params["clip"], defence.params["noise_multiplier"]
    twin = copy.deepcopy(model)  # Opacus hooks its own copy: the client's model stays as it is
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns of secure_mode and the like, for training runs
        sampled = GradSampleModule(twin)
        params = [p for p in sampled.parameters() if p.requires_grad]
        optimiser = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                                expected_batch_size=len(x))
        # contiguous: on an image laid out channels last (a photograph's, permuted from HWC), Opacus 1.6's
        # per-sample gradient of the first convolution is wrong (177% off on cnn2_c1), though its mean is right;
        # tests/test_batches.py checks them image by image against autograd
        loss = F.cross_entropy(sampled(x.detach().contiguous()), torch.tensor(labels, device=x.device))
        loss.backward()
        before = global_norm([p.grad_sample.mean(0) for p in params])  # the mean gradient, undefended
        optimiser.pre_step()
    shared = add_noise([p.grad.detach().clone() for p in params], z * clip / len(x), seed)
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=z, sample_rate=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at small Z the bound rests on its smallest order: epsilon is vast anyway
        epsilon = accountant.get_epsilon(DELTA) if z > 0 else math.inf
    record = {"spec": defence.spec, "kind": defence.kind, **defence.params, "seed": seed, "batch": len(x),
              "epsilon": epsilon if math.isfinite(epsilon) else None, "delta": DELTA, "sample_rate": 1.0}
    return shared, record | {"norm_before": before, "norm_after": global_norm(shared)}


def defend(grads: list[torch.Tensor], defence: Defence, seed: int) -> tuple[list[torch.Tensor], dict]:
    """The gradient the client shares under `defence`, and what results.json records of it:
    the spec, its parameters, the noise's seed and the gradient's norm before and after."""
    kind = DEFENCES[defence.kind]
    record = {"spec": defence.spec, "kind": defence.kind, **defence.params} | ({"seed": seed} if kind.seeded else {})
    before, shared = global_norm(grads), kind.apply(grads, defence.params, seed)
    return shared, record | {"norm_before": before, "norm_after": global_norm(shared)}


def surviving(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per parameter, the entries a pruned gradient still holds (its nonzeros): the
    equations R-GAP and the hybrid keep under pruning."""
    return [g != 0 for g in grads]


def fc_inputs_undetermined(model: Net, known: list[torch.Tensor]) -> float:
    """The fraction of the fc layer's inputs a_j that no surviving equation gW_ij = d_i a_j
    with d_i = gb_i surviving determines (invert_pruned_fc leaves them at 0, the minimum
    norm). The paper's index counts the convolutions' systems only and weighs the top layer
    0; this is what pruning takes from the fc's inversion, for reading the index beside."""
    known_w, known_b = by_layer(model, known)[model.first_linear]
    return float((~(known_w & known_b[:, None]).any(0)).double().mean())


def canonical_defences(specs: list[str]) -> list[str]:
    """The specs in their canonical spelling, each once: two spellings of one defence are one
    cell of the grid, and the record names it so (a resume and a merge agree on it)."""
    out = [parse_defence(spec).spec for spec in specs]
    if len(set(out)) < len(out):
        say("defences given twice (in whatever spelling) run once")
    for spec, canonical in dict.fromkeys(zip(specs, out)):
        if spec != canonical and spec.strip() != canonical:
            say(f"--defence {printable(spec, 60)} is {canonical}")
    return list(dict.fromkeys(out))
