"""The paper: Cangxiong Chen and Neill D. F. Campbell, "Analysing Training-Data Leakage from
Gradients through Linear Systems and Gradient Matching", BMVC 2022 (arXiv:2210.13231), top to
bottom in the order its data flows.

A client computes the cross-entropy gradient of one private image on a CNN and shares it.
The attacker holds the architecture, the weights and that gradient:

    the client's gradient, and the label it gives away       client_gradient, recover_label
    each layer's equations: the forward map M x = z - b
      and the gradient constraints G(delta) x = gW           invert_fc, conv_matrix, grad_matrix,
                                                             LayerSystem, layer_system
    R-GAP's recursion, from the last layer down to the image recursive_reconstruction, solve_layer
    what the ranks say without an attack                     security_index, worst_layer_fraction
    R-GAP (Zhu and Blaschko, ICLR 2021)                      attack_rgap
    the hybrid: each layer's least-squares solution
      corrected by gradient matching on J                    objective (J, once), gradient_matching,
                                                             hybrid, attack_hybrid
    hybrid_free (ours): only where the ranks leave freedom   attack_hybrid_free

The numerics under the systems (minimum-norm solves with certified ranks, the memo of steps
the attacks of a cell share) are leakage/solvers.py; the activations' inverses and
derivatives, leakage/activations.py.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from leakage import report
from leakage.activations import activation_derivative, inverse_activation
from leakage.console import progress, say
from leakage.defences import surviving
from leakage.matching import AttackResult, dummy_gradient
from leakage.models import by_layer, gradients_from
from leakage.solvers import (
    MISSING, digest, gram_solution, kept_step, memo_step, memoised, solve_min_norm, step_key, taken_step
)

if TYPE_CHECKING:  # annotations alone
    from leakage.models import Net
    from leakage.settings import AttackSettings
    from leakage.solvers import StepMemo

# =============================================================================
# The client's gradient: the only code that sees the private image (or, with --gradient,
# the gradient a client shared, captured elsewhere)
# =============================================================================


def client_gradient(model: Net, x: torch.Tensor, label: int | tuple[int, ...]) -> list[torch.Tensor]:
    """What the client shares: d CE(model(x), label) / d theta, one tensor per parameter (on
    a batch, of the mean cross-entropy, as PyTorch computes it)."""
    labels = [label] if isinstance(label, int) else list(label)
    loss = F.cross_entropy(model(x), torch.tensor(labels, device=x.device))
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def recover_label(grads: list[torch.Tensor], bias_at: int = -1) -> int:
    """iDLG rule (Zhao et al., 2020): the only negative entry of the output layer's bias
    gradient (the last parameter's in a chain; a module's: Classifier.bias_at)."""
    return int(grads[bias_at].argmin())


# =============================================================================
# Linear systems: each layer's equations, and the recursion that solves them
# =============================================================================
#
# The recursion of R-GAP (Zhu and Blaschko, ICLR 2021), which the paper's hybrid shares.
# Layers are l = 0..L-1, the last one fully connected; a_{-1} is the image,
# z_l = layer_l(a_{l-1}) and a_l = act_l(z_l).
#
# 1. The linear layer z = W a + b has gradients gW = d a^T and gb = d (d = dL/dz), so
#    a = gW^T gb / (gb^T gb), and dL/da = W^T d.                          (invert_fc)
# 2. At each convolution, from l = L-2 down to 0, with the estimate of a_l and dL/da_l:
#    - z_l = act^-1(a_l), clipped to stay finite, and delta_l = dL/da_l * act'(z_l);
#    - the unknown x = a_{l-1}, flattened, satisfies two sets of linear equations:
#      the forward map M x = z_l - b_l (M: the convolution as a matrix) and the
#      gradient constraints G(delta_l) x = gW_l (G: x -> the weight gradient);
#    - x = the minimum-norm least-squares solution of U x = V, U = [M; G], V = [z - b; gW],
#      solved in float64, U first reduced to an orthogonally equivalent system with fewer
#      rows where its structure allows;  (layer_system, reduced_matrices, solve_min_norm)
#    - dL/da_{l-1} = M^T delta_l.
# The rank deficiency of layer l is r_l = rank(U) - n_l (n_l unknowns): 0 where its input
# is determined, -k where a k-dimensional family of inputs fits both sets of equations.


def invert_fc(fc: nn.Linear, g_w: torch.Tensor, g_b: torch.Tensor,
              known: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Input a and dL/da of the linear layer from its gradients (step 1 above).

    gW = d a^T and gb = d, so a = gW^T gb / gb^T gb: the least-squares solution over
    all rows (the published code divided one row by one entry). Under pruning (`known`:
    the entries of gW and gb that survive) the same least squares over what survives.
    """
    d, g_w = g_b.detach().double().cpu(), g_w.detach().double().cpu()
    if known is None:
        return g_w.T @ d / (d @ d), fc.weight.detach().double().cpu().T @ d
    return invert_pruned_fc(fc, g_w, d, *known)


def invert_pruned_fc(fc: nn.Linear, g_w: torch.Tensor, d: torch.Tensor, known_w: torch.Tensor,
                     known_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """invert_fc over the surviving entries: gW_ij = d_i a_j for each surviving (i, j).

    a_j = sum_i d_i gW_ij / sum_i d_i^2 over the rows i whose gW_ij and d_i both survive
    (0, the minimum norm, where none does); then each pruned d_i = sum_j gW_ij a_j /
    sum_j a_j^2 over its row's surviving j, the least squares of the same equations.
    """
    both = (known_w & known_b[:, None]).double()  # (10, n): equations with d_i known
    num, den = (both * d[:, None] * g_w).sum(0), (both * d[:, None] ** 2).sum(0)
    a = torch.where(den > 0, num / den.where(den > 0, 1.0), 0.0)
    row = known_w.double()
    num, den = (row * g_w * a).sum(1), (row * a ** 2).sum(1)
    d = torch.where(known_b, d, torch.where(den > 0, num / den.where(den > 0, 1.0), 0.0))
    return a, fc.weight.detach().double().cpu().T @ d


def patch_index(conv: nn.Conv2d, in_shape: tuple) -> torch.Tensor:
    """(C_in*k*k, P): flat input index under each entry of each patch, -1 on padding.

    Unfolding an image whose pixels hold their own index lets the framework do the
    convolution's index bookkeeping; rows are ordered like the weight's (c, i, j).
    """
    n = math.prod(in_shape)
    ids = torch.arange(1, n + 1, dtype=torch.float64).view(1, *in_shape)  # exact up to 2^53
    return F.unfold(ids, conv.kernel_size, padding=conv.padding, stride=conv.stride)[0].long() - 1


def conv_matrix(conv: nn.Conv2d, in_shape: tuple, idx: torch.Tensor | None = None) -> torch.Tensor:
    """M with M @ x.flatten() = conv2d(x, W).flatten() (no bias), float64.

    Row (o, p) holds W[o] at the input positions of patch p.
    """
    idx = patch_index(conv, in_shape) if idx is None else idx
    w = conv.weight.detach().double().cpu().flatten(1)  # (C_out, C_in*k*k)
    n_pos = idx.shape[1]
    rows = torch.arange(w.shape[0] * n_pos).view(-1, 1, n_pos)  # (C_out, 1, P)
    rows, cols = torch.broadcast_tensors(rows, idx[None])  # (C_out, Ckk, P)
    vals = w[:, :, None].expand_as(rows)
    return _scatter((w.shape[0] * n_pos, math.prod(in_shape)), rows, cols, vals)


def grad_matrix(conv: nn.Conv2d, in_shape: tuple, delta: torch.Tensor,
                idx: torch.Tensor | None = None) -> torch.Tensor:
    """G(delta) with G @ x.flatten() = dL/dW.flatten() for input x and dL/dz = delta.

    dL/dW[o, c, i, j] = sum_p delta[o, p] x[patch p at (c, i, j)], so row (o, c, i, j)
    holds delta[o, p] at the input position of entry (c, i, j) of patch p.
    """
    idx = patch_index(conv, in_shape) if idx is None else idx
    d = delta.detach().double().cpu().reshape(-1, idx.shape[1])  # (C_out, P); any number of rows (reduced_matrices)
    n_ckk = idx.shape[0]
    rows = torch.arange(d.shape[0] * n_ckk).view(-1, n_ckk, 1)  # (C_out, Ckk, 1)
    rows, cols = torch.broadcast_tensors(rows, idx[None])
    vals = d[:, None, :].expand_as(rows)
    return _scatter((d.shape[0] * n_ckk, math.prod(in_shape)), rows, cols, vals)


def _scatter(shape: tuple, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Dense matrix with the given entries; padding (col -1) dropped. No (row, col) repeats."""
    keep = cols >= 0
    out = torch.zeros(shape, dtype=torch.float64)
    out[rows[keep], cols[keep]] = vals[keep]
    return out


@dataclass
class LayerSystem:
    """Both sets of linear equations on the input x of convolution `layer` (step 2 above)."""

    layer: int
    z_minus_b: torch.Tensor  # what M x must equal: z_l - b_l, shape (1, C_out, H, W)
    delta: torch.Tensor  # dL/dz_l, same shape
    g_w: torch.Tensor  # the shared weight gradient of the layer: what G(delta) x must equal
    known: torch.Tensor | None = None  # under pruning, gW's surviving entries: G's rows that are equations

    def to(self, dtype: torch.dtype, device: str | torch.device) -> LayerSystem:
        known = None if self.known is None else self.known.to(device)
        return LayerSystem(self.layer, *(t.to(dtype=dtype, device=device) for t in
                                         (self.z_minus_b, self.delta, self.g_w)), known)

    def matrices(self, model: Net) -> tuple[torch.Tensor, torch.Tensor]:
        """U = [M; G] and V = [z - b; gW], dense float64 on the CPU; under pruning, G and
        gW keep the surviving rows only (a pruned entry is no equation, not "0 = G x")."""
        conv, shape = model.layers[self.layer], model.shapes[self.layer]
        idx = patch_index(conv, shape)
        G, g_w = self.gradient_equations(conv, shape, idx, reduce=False)
        return torch.cat([conv_matrix(conv, shape, idx), G]), torch.cat([self.z_minus_b.flatten().double().cpu(), g_w])

    def reduced_matrices(self, model: Net, forward: ForwardMap) -> tuple[torch.Tensor, torch.Tensor]:
        """U and V of `matrices` times an orthogonal matrix, with fewer rows where the
        structure allows (`equations` counts those U stands for). The singular values and
        the least-squares solutions are U's (||U x - V||^2 changes by a constant).

        M, fixed by the weights, becomes its R factor where it has more rows than columns
        (M = Q_M R_M, factored once per weights in a process: `forward`, from forward_map),
        and z - b its part Q_M^T (z - b); G as gradient_equations reduces it.
        """
        conv, shape = model.layers[self.layer], model.shapes[self.layer]
        M, v_m = forward.M, self.z_minus_b.flatten().double().cpu()
        if forward.qr is not None:
            a, tau = forward.qr
            M, v_m = a[:a.shape[1]].triu(), torch.ormqr(a, tau, v_m[:, None], transpose=True)[:a.shape[1], 0]
        G, g_w = self.gradient_equations(conv, shape, forward.idx, reduce=True)
        return torch.cat([M, G]), torch.cat([v_m, g_w])

    def gradient_equations(self, conv: nn.Conv2d, shape: tuple, idx: torch.Tensor,
                           reduce: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """G(delta) and gW, flattened; under pruning, the surviving rows only. With `reduce`,
        fewer rows where delta (C_out x P) has more rows than columns: G(delta) x is
        delta cols(x)^T, so with delta = Q R, Q^T G(delta) = G(R) and gW becomes Q^T gW
        (C_out C_in k k rows become P C_in k k). Pruning's surviving rows break that structure."""
        delta, g_w = self.delta.double().cpu().reshape(conv.out_channels, -1), self.g_w.double().cpu().flatten(1)
        if self.known is not None:
            rows = self.known.flatten().cpu()
            return grad_matrix(conv, shape, delta, idx)[rows], g_w.flatten()[rows]
        if reduce and delta.shape[0] > delta.shape[1]:
            q, delta = torch.linalg.qr(delta)
            g_w = q.T @ g_w
        return grad_matrix(conv, shape, delta, idx), g_w.flatten()

    def equations(self) -> int:
        """How many equations the system holds: M's rows and G's (under pruning, those that survive)."""
        return self.z_minus_b.numel() + (self.g_w.numel() if self.known is None else int(self.known.sum()))

    def forward_and_residual(self, model: Net, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's pre-activation z(x) and ||U x - V||^2, U never formed.

        One im2col of x serves the forward map (W cols) and the weight-gradient map
        (delta cols^T); the hybrid passes z on to the layers above, so the convolution
        and its gradients are computed once per step. The weights are taken in x's dtype
        and device (R-GAP's recursion asks in float64 on the CPU: relative_residual).
        """
        conv = model.layers[self.layer]
        cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)[0]  # (C_in k k, P)
        z = (conv.weight.to(x).flatten(1) @ cols).view_as(self.z_minus_b)
        weight_grad = self.delta.reshape(conv.out_channels, -1) @ cols.T  # (C_out, C_in*k*k)
        misfit = weight_grad - self.g_w.flatten(1)
        if self.known is not None:  # the pruned entries are no equations
            misfit = misfit * self.known.flatten(1)
        residual = (z - self.z_minus_b).square().sum() + misfit.square().sum()
        return (z if conv.bias is None else z + conv.bias.view(1, -1, 1, 1)), residual


@dataclass(frozen=True)
class ForwardMap:
    """What a convolution's systems take from its weights alone: the patch index, M, M's
    Householder QR (torch.geqrf) where M has more rows than columns, and M^T M where the
    systems have at least as many equations as unknowns (gram_solution)."""

    idx: torch.Tensor
    M: torch.Tensor
    qr: tuple[torch.Tensor, torch.Tensor] | None
    gram: torch.Tensor | None = None


FORWARD_MAPS: dict[tuple, ForwardMap] = {}  # the latest, by weights and input shape, oldest first
FORWARD_MAPS_BYTES = 2**31  # kept while they fit (a zoo model's layers: at most about 0.6 GB)


def forward_map(conv: nn.Conv2d, shape: tuple) -> ForwardMap:
    """The convolution's ForwardMap, built once per weights and input shape in a process:
    the images of a model in a worker and the attacks of a cell share it (#33)."""
    key = (digest(conv.weight), conv.stride, conv.padding, tuple(shape))
    if key not in FORWARD_MAPS:
        idx = patch_index(conv, shape)
        M = conv_matrix(conv, shape, idx)
        tall = M.shape[0] + conv.weight.numel() >= M.shape[1]  # [M; G] has as many rows as columns
        FORWARD_MAPS[key] = ForwardMap(idx, M, torch.geqrf(M) if M.shape[0] > M.shape[1] else None,
                                       M.T @ M if tall else None)
        while len(FORWARD_MAPS) > 1 and sum(map(map_bytes, FORWARD_MAPS.values())) > FORWARD_MAPS_BYTES:
            del FORWARD_MAPS[next(iter(FORWARD_MAPS))]
    return FORWARD_MAPS[key]


def map_bytes(forward: ForwardMap) -> int:
    tensors = [forward.idx, forward.M, *(forward.qr or ()), *([] if forward.gram is None else [forward.gram])]
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_system(model: Net, layer: int, a_hat: torch.Tensor, dl_da: torch.Tensor,
                 grads: list[torch.Tensor], known: list[torch.Tensor] | None = None) -> LayerSystem:
    """From the estimate of a layer's output and dL/d(output): z, delta and the equations
    (under pruning, those of gW's entries that `known`, per parameter, says survive)."""
    conv, act = model.layers[layer], model.acts[layer]
    c, h, w = model.shapes[layer + 1]
    z = inverse_activation(act, a_hat.reshape(1, c, h, w))
    delta = dl_da.reshape(1, c, h, w) * activation_derivative(act, z)
    if conv.bias is not None:  # the forward constraints hold for z - b
        z = z - conv.bias.detach().double().cpu().view(1, -1, 1, 1)
    return LayerSystem(layer, z, delta, by_layer(model, grads)[layer][0].double(),
                       None if known is None else by_layer(model, known)[layer][0])


# R-GAP is scale-free in exact arithmetic: a gradient times s gives the same image. Its
# least squares are not: each convolution's system stacks the forward rows (M x = z - b, of
# the network's scale) over the gradient rows (G(delta) x = gW, of the gradient's), so the
# gradient's scale weighs one kind against the other. One image's cross-entropy gradient has
# its output bias gradient's largest entry at most 1 (p - onehot); the published code solves
# it at that scale, and so do we (every committed number). A gradient far larger than any one
# image's (a sum, a scaled copy: 1e15 gave 11 dB where the gradient gave 146, and took 4-17x
# as long) is brought back by a power of two, which changes no bit of its entries, until that
# entry is within (1/2, 1]. Smaller gradients stay as given: a confident model's is small by
# nature, and the published weighting is the paper's.
LARGEST_SCALE = 2.0**10  # the output bias gradient's largest entry beyond which a gradient is rescaled


def rescaled(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """`grads` (the output bias gradient last) by 2^-k where its largest entry is above
    LARGEST_SCALE, so that it lands in (1/2, 1]; as given otherwise."""
    top = float(grads[-1].abs().max())
    if not top > LARGEST_SCALE:
        return grads
    _, exponent = math.frexp(top)  # top = m 2^exponent, m in [1/2, 1)
    return [torch.ldexp(g, torch.tensor(-exponent, dtype=torch.int32)) for g in grads]


CorrectionRule = Callable[[list[int]], bool]  # the deficiencies of layers l, l+1, ... -> correct layer l?
# (the clients' indices, their systems, their x_hats) -> the x each passes down (hybrid)
Corrections = Callable[[list[int], list[LayerSystem], list[torch.Tensor]], list[torch.Tensor]]


class Recovered(NamedTuple):
    """What R-GAP's recursion gives of one client: the image estimate (1, C, H, W); each
    layer's rank deficiency but the last's (layer 0 first; a linear layer's is 0); and each
    layer's relative least-squares residual ||U x - V|| / ||V|| at its solution (a linear
    layer's None)."""

    x: torch.Tensor
    deficiency: list[int]
    residual: list[float | None]


def relative_residual(model: Net, system: LayerSystem, x: torch.Tensor) -> float:
    """||U x - V|| / ||V|| of a convolution's system at x, in float64, U never formed. Where
    the gradient is one image's through these weights, the topmost convolution's system
    holds to float rounding (about 1e-7: the gradient is float32); a gradient of other
    weights (another model, or these one SGD step before) leaves 1e-4 or more."""
    with torch.no_grad():
        _, residual = system.forward_and_residual(model, x.double())
    size = system.z_minus_b.square().sum() + system.g_w.square().sum()
    return float(residual.sqrt() / size.sqrt())


def recursive_reconstruction(models: list[Net], grads: list[list[torch.Tensor]], correct: Corrections | None = None,
                             verbose: bool = False, rule: CorrectionRule | None = None,
                             known: list[list[torch.Tensor] | None] | None = None,
                             memos: list[StepMemo | None] | None = None) -> list[Recovered]:
    """R-GAP's recursion (steps 1 and 2 above), from the fc layer down to the image, of
    several clients' gradients (models of one architecture; one client is a batch of one):
    for each, what Recovered holds, the residuals at the least-squares solutions (before any
    correction). Under pruning, `known` (per client and parameter, the surviving entries)
    drops the pruned equations.

    The clients go in step, layer by layer: at each layer every client's solve, one after another, within
    its own StepMemo (`memos`; None: the current ones). `correct` (the hybrid's gradient
    matching) may then replace the least-squares solutions before they are passed down, in
    one call for the clients that make a correction there: correct(their indices, systems,
    x_hats). A client corrects at every layer, or only at the layers l where
    `rule(deficiency[l:])` holds of its ranks (the recursion runs from the top, so layer
    l's and the deficiencies above it are known by then)."""
    n, n_layers, top = len(models), len(models[0].layers), models[0].first_linear
    grads = [rescaled([g.detach().double().cpu() for g in client]) for client in grads]  # in float64 on the CPU
    known = [None if k is None else [t.cpu() for t in k] for k in (known or [None] * n)]
    memos = memos or [None] * n
    a_hat, dl_da = map(list, zip(*(invert_fc(model.layers[top], *by_layer(model, g)[top],
                                             None if k is None else tuple(by_layer(model, k)[top]))
                                   for model, g, k in zip(models, grads, known))))
    # the first linear layer's input, from its own gradient (with several, those above it
    # are determined each by its own gradient too: deficiency 0, nothing to solve)
    deficiency = [[0] * (n_layers - 1) for _ in models]
    residual: list[list[float | None]] = [[None] * (n_layers - 1) for _ in models]
    for layer in progress(range(top - 1, -1, -1), "layers"):
        systems = []
        for i, model in enumerate(models):
            with memoised(memos[i]):
                inputs = ("solve", layer, a_hat[i], dl_da[i], known[i] is not None)
                system, x_hat, rank, dl_da[i], size = memo_step(inputs, functools.partial(
                    solve_layer, model, layer, a_hat[i], dl_da[i], grads[i], known[i]))
            systems.append(system)
            deficiency[i][layer] = rank - size[1]
            a_hat[i] = x_hat.view(1, *model.shapes[layer])
            residual[i][layer] = relative_residual(model, system, a_hat[i])
            if verbose:
                say(f"  layer {layer}: {size[0]} equations, {size[1]} unknowns, rank {rank}, "
                    f"deficiency {deficiency[i][layer]}")
        todo = [i for i in range(n) if correct is not None and (rule is None or rule(deficiency[i][layer:]))]
        if todo:
            for i, x in zip(todo, correct(todo, [systems[i] for i in todo], [a_hat[i] for i in todo])):
                a_hat[i] = x.double().cpu()
    return [Recovered(a.float(), d, r) for a, d, r in zip(a_hat, deficiency, residual)]


def solve_layer(model: Net, layer: int, a_hat: torch.Tensor, dl_da: torch.Tensor, grads: list[torch.Tensor],
                known: list[torch.Tensor] | None) -> tuple[LayerSystem, torch.Tensor, int, torch.Tensor, tuple]:
    """One step of the recursion at convolution `layer`: its system, the minimum-norm
    least-squares solution and U's rank, dL/da of the layer below (M^T delta), and U's shape
    (its equations, however few rows the reduced system has, and its unknowns)."""
    system = layer_system(model, layer, a_hat, dl_da, grads, known)
    conv, shape = model.layers[layer], model.shapes[layer]
    forward = forward_map(conv, shape)
    equations, unknowns = system.equations(), math.prod(shape)
    solved = gram_solution(system, conv, forward, equations)
    if solved is None:
        x_hat, rank = solve_min_norm(*system.reduced_matrices(model, forward), equations)
    else:
        x_hat, rank = solved
    return system, x_hat, rank, forward.M.T @ system.delta.flatten(), (equations, unknowns)


def security_index(deficiency: list[int]) -> int:
    """The paper's security index: sum_l round(r_l (L-1-l) / (L-1)) over the convolutions
    l = 0..L-2 (the published code prints it as the "COPA index").

    Layers nearer the input weigh more. 0: every layer is determined and the image is
    recovered exactly, up to conditioning; the more negative, the more of it is free.
    A property of the architecture, the weights and the input; it needs no attack.
    """
    n = len(deficiency)  # = L - 1
    return int(sum(round(r * (n - l) / n) for l, r in enumerate(deficiency)))


def worst_layer_fraction(deficiency: list[int], unknowns: list[int]) -> float:
    """Ours, beside the paper's index: min_l r_l / n_l, the largest fraction of any one
    convolution's n_l unknowns that its system leaves free (r_l = rank - n_l <= 0). In
    [-1, 0]: 0 exactly where the paper's index is 0 before rounding (every layer
    determined), -1 where some layer's equations determine nothing. How it was chosen, and
    the test it was fixed before: docs/study.md."""
    return min(r / n for r, n in zip(deficiency, unknowns))


def indices_of(deficiency: list[int] | None, unknowns: list[int] | None) -> dict[str, float | None]:
    """Both indices of a (model, image) from its rank deficiencies and each layer's
    unknowns (None where either is unknown)."""
    if deficiency is None:
        return dict.fromkeys(report.INDICES)
    return {"security_index": security_index(deficiency),
            "worst_layer_fraction": None if unknowns is None else worst_layer_fraction(deficiency, unknowns)}


def rank_deficiency(model: Net, grads: list[torch.Tensor], known: list[torch.Tensor] | None = None) -> list[int]:
    """Each convolution's rank deficiency (layer 0 first), from R-GAP's recursion alone;
    with `known`, of the equations that survive pruning."""
    return recursive_reconstruction([model], [grads], known=[known])[0].deficiency


# =============================================================================
# R-GAP (Zhu and Blaschko, ICLR 2021): the recursion with least squares alone
# =============================================================================


def known_entries(grads: list[torch.Tensor], settings: AttackSettings) -> list[torch.Tensor] | None:
    """The entries of the shared gradient that are equations for R-GAP and the hybrid:
    all (None), or under pruning the nonzeros alone."""
    return surviving(grads) if settings.zeros_are_missing else None


def attack_rgap(model: Net, grads: list[torch.Tensor], label: int, settings: AttackSettings) -> AttackResult:
    ((x, deficiency, residual),) = recursive_reconstruction([model], [grads], verbose=settings.verbose,
                                                            known=[known_entries(grads, settings)])
    return AttackResult(x.to(grads[0].device), label, {"rank_deficiency": deficiency, "residual": residual,
                                                       "security_index": security_index(deficiency)})


# =============================================================================
# The hybrid attack (the paper): least squares, then gradient matching, at every convolution
# =============================================================================
#
# R-GAP's recursion, but each layer's least-squares solution x_hat is corrected before it
# is passed down: Adam (lr 1e-3, PyTorch's defaults, on a float32 copy), from x_hat, on
#
#     J(x) = w_cos sum_p (1 - cos(grad_p CE(f_{l:}(x), y), g_p)) + w_tv TV(x) + w_sq ||Ux - V||^2
#
# f_{l:} is the network from layer l up; p ranges over the parameters of layers l..L-1,
# g_p is their shared gradient; y is the label every attack uses. The weights and step
# counts per layer are hybrid_schedule's.


def hybrid_schedule(layer: int, settings: AttackSettings) -> tuple[float, float, float, int]:
    """(w_cos, w_tv, w_sq, Adam steps) for a layer, as the published code set them:

        layer            w_cos  w_tv  w_sq  Adam steps
        0 (the image)      1     1    0.05  N0 (hybrid_iters_first; paper 10000)
        1                  1     1    0.1   4 N (hybrid_iters N; paper 2000)
        2 and above       10     0.1  1     N // 2
    """
    if layer == 0:
        return 1.0, 1.0, 0.05, settings.hybrid_iters_first
    if layer == 1:
        return 1.0, 1.0, 0.1, 4 * settings.hybrid_iters
    return 10.0, 0.1, 1.0, settings.hybrid_iters // 2


def hybrid_objective(model: Net, system: LayerSystem, x: torch.Tensor, shared: list[torch.Tensor],
                     target: torch.Tensor, weights: tuple[float, float, float],
                     known: list[torch.Tensor] | None = None, functional: bool = False) -> torch.Tensor:
    """The paper's J(x) (objective) at layer l = system.layer, for one image. `shared` is the shared gradient of
    layers l..L-1 (gradients_from), `target` the label as a (1,) tensor, and `system`
    holds tensors of x's dtype and device. Under pruning the cosine compares the surviving
    entries alone (`known`, as `shared`; the residual drops the pruned ones itself).

    The dummy gradient grad_p CE(f_{l:}(x), y) is taken by autograd's double backward, with
    layer l's forward shared between the residual ||Ux - V||^2 and f_{l:}(x); or, where
    `functional`, through torch.func (functional_call and a nested grad), the form
    torch.compile can trace (Dynamo cannot trace a double backward). The two are equal in
    value; the functional form runs layer l's convolution a second time, inside
    functional_call, as the weight's gradient must be taken through it.
    """
    z, residual = system.forward_and_residual(model, x)
    if functional:
        dummy = functional_dummy_gradient(model, x, target, system.layer)
    else:
        output = model(model.acts[system.layer](z), system.layer + 1)  # f_{l:}(x)
        dummy = dummy_gradient(model, output, target, system.layer)  # p in layers l..L-1
    if known is not None:
        dummy = [d * k for d, k in zip(dummy, known)]
    directions = [direction(g.flatten()[None]) for g in shared]
    return objective([d[None] for d in dummy], directions, x, residual.reshape(1), weights)[0]


def functional_dummy_gradient(model: Net, x: torch.Tensor, target: torch.Tensor, start: int) -> list[torch.Tensor]:
    """dummy_gradient(model, model(x, start), target, start) through torch.func."""
    params = {f"layers.{i}.{name}": p.detach() for i in range(start, len(model.layers))
              for name, p in model.layers[i].named_parameters()}
    loss = lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x, start)), target)  # noqa: E731
    return list(torch.func.grad(loss)(params).values())


GradAndValue = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (dJ/dx, J)


def hybrid_grad_and_value(model: Net, system: LayerSystem, shared: list[torch.Tensor], label: int,
                          weights: tuple[float, float, float], compile: bool,
                          known: list[torch.Tensor] | None = None) -> GradAndValue:
    """x -> (dJ/dx, J): a double backward through autograd, or with --compile the
    torch.func form of J, traced and compiled once per layer shape (compiled_grad_and_value)."""
    target = torch.tensor([label], device=system.z_minus_b.device)
    if compile:
        return lambda x: compiled_grad_and_value()(model, system, x.detach(), shared, target, weights, known)

    def eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        objective = hybrid_objective(model, system, x, shared, target, weights, known)
        return torch.autograd.grad(objective, [x])[0], objective
    return eager


def compiled_gradient_matching(model: Net, system: LayerSystem, x_hat: torch.Tensor, *,
                               grads: list[torch.Tensor], label: int, settings: AttackSettings) -> torch.Tensor:
    """The hybrid's correction of convolution l's least-squares solution x_hat: Adam
    (lr 1e-3, PyTorch's defaults) from a float32 copy of x_hat on J(x), with the weights
    and the number of steps of hybrid_schedule for layer l. One image through
    hybrid_objective: the form --compile compiles; without it, gradient_matching
    runs every image through batched_objective."""
    device = grads[0].device
    *weights, steps = hybrid_schedule(system.layer, settings)
    system = system.to(torch.float32, device)
    shared = gradients_from(model, grads, system.layer)  # g_p, p in layers l..L-1
    known = known_entries(shared, settings)
    grad_and_value = hybrid_grad_and_value(model, system, shared, label, tuple(weights), settings.compile, known)
    return adam(x_hat.float().to(device), grad_and_value, steps, f"hybrid layer {system.layer}")


def adam(x: torch.Tensor, grad_and_value: GradAndValue, steps: int, what: str) -> torch.Tensor:
    """`steps` of Adam (lr 1e-3, PyTorch's defaults) from x on the objective whose
    gradient and value (one per image of a batch) grad_and_value gives."""
    x = x.requires_grad_()
    opt = torch.optim.Adam([x], lr=1e-3)
    bar = progress(steps, what)
    for step in bar:
        x.grad, objective = grad_and_value(x)
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(J=f"{objective.mean().item():.4g}", refresh=False)
    return x.detach()


def gradient_matching(models: list[Net], systems: list[LayerSystem], x_hats: list[torch.Tensor], *,
                               grads: list[list[torch.Tensor]], labels: list[int],
                               settings: AttackSettings) -> list[torch.Tensor]:
    """The hybrid's correction of convolution l's least-squares solutions x_hat of several
    clients (models of one architecture, at least one): Adam (lr 1e-3, PyTorch's defaults)
    from float32 copies on each one's J, with the weights and the number of steps of
    hybrid_schedule for layer l, as one batch (batched_objective); with --compile one at a
    time (compiled_gradient_matching).

    The batch minimises the sum over clients of each one's J with one Adam over the
    stacked x. Adam is elementwise and each J reads its own x alone, so each client
    follows its own trajectory, and batched_objective computes each client's J and dJ/dx
    to the bit as it does for that client alone: a client's numbers do not depend on the
    batch it was in (tests). They equal compiled_gradient_matching's to float32 rounding. On a CPU
    batching halves a step's per-operation overhead per image (docs/performance.md); on a
    GPU it fills the device.
    """
    if settings.compile:  # Dynamo traces no double backward: --compile matches one at a time
        return [compiled_gradient_matching(model, system, x_hat, grads=g, label=label, settings=settings)
                for model, system, x_hat, g, label in zip(models, systems, x_hats, grads, labels)]
    device, layer = grads[0][0].device, systems[0].layer
    *weights, steps = hybrid_schedule(layer, settings)
    shared = [gradients_from(model, g, layer) for model, g in zip(models, grads)]  # g_p, p in layers l..L-1
    known = [known_entries(s, settings) for s in shared]
    batch = Batch.of(models, [system.to(torch.float32, device) for system in systems],
                     shared, None if known[0] is None else known, torch.tensor(labels, device=device))

    def grad_and_value(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        objective = batched_objective(models[0], batch, x, tuple(weights))
        return torch.autograd.grad(objective.sum(), [x])[0], objective
    x = torch.cat([x_hat.float().to(device) for x_hat in x_hats])
    what = f"hybrid layer {layer}" + (f", {len(models)} images" if len(models) > 1 else "")
    return list(adam(x, grad_and_value, steps, what).split(1))


class Batch(NamedTuple):
    """What batched_objective reads of B clients at convolution `layer`, each stacked on a
    first axis of B: their systems, the parameters of layers l..L-1 (per client, so that
    each one's dummy gradient is its own), their shared gradients g_p and labels."""

    layer: int
    z_minus_b: torch.Tensor  # (B, C_out, P)
    delta: torch.Tensor  # (B, C_out, P)
    g_w: torch.Tensor  # (B, C_out, C_in k k)
    known_w: torch.Tensor | None  # (B, C_out, C_in k k): under pruning, gW's surviving entries
    params: list[torch.Tensor]  # each (B, *shape), requiring grad
    shared: list[torch.Tensor]  # each (B, size): the shared gradients' directions, g_p / ||g_p||
    known: list[torch.Tensor] | None  # under pruning, as shared
    target: torch.Tensor  # (B,)

    @staticmethod
    def of(models: list[Net], systems: list[LayerSystem], shared: list[list[torch.Tensor]],
           known: list[list[torch.Tensor]] | None, target: torch.Tensor) -> Batch:
        layer, out = systems[0].layer, models[0].layers[systems[0].layer].out_channels
        stack = lambda tensors, *shape: torch.stack([t.reshape(*shape) for t in tensors])  # noqa: E731
        params = [torch.stack(p).detach().requires_grad_() for p in
                  zip(*([p for m in model.layers[layer:] for p in m.parameters()] for model in models))]
        return Batch(layer, stack([s.z_minus_b for s in systems], out, -1), stack([s.delta for s in systems], out, -1),
                     stack([s.g_w for s in systems], out, -1),
                     None if systems[0].known is None else stack([s.known for s in systems], out, -1),
                     params, [direction(torch.stack(p).flatten(1)) for p in zip(*shared)],
                     None if known is None else [torch.stack(k) for k in zip(*known)], target)


def direction(g: torch.Tensor) -> torch.Tensor:
    """Each row of g over its norm (a zero row stays zero, as in F.cosine_similarity's eps)."""
    return g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-10)


def batched_objective(model: Net, batch: Batch, x: torch.Tensor, weights: tuple[float, float, float]) -> torch.Tensor:
    """Each client's J (objective) at x (B, C, H, W): a (B,) tensor. The layers
    l..L-1 run as unfold and batched matrix products with each client's own parameters,
    so that autograd gives per-client dummy gradients (a functorch vmap over J's
    functional form measured 1.7x slower on the CPU: docs/performance.md)."""
    a, k, n = x, 0, len(x)
    for i in range(batch.layer, len(model.layers)):
        layer, act = model.layers[i], model.acts[i]
        if isinstance(layer, nn.Linear):
            z = torch.linalg.vecdot(batch.params[k], a.flatten(1)[:, None, :])  # not bmm: (B, K, 1) rounds by B
        else:
            cols = F.unfold(a, layer.kernel_size, padding=layer.padding, stride=layer.stride)  # (B, C_in k k, P)
            z = torch.bmm(batch.params[k].flatten(2), cols)  # (B, C_out, P)
            if i == batch.layer:  # layer l's equations: M x = z - b and G(delta) x = gW, U never formed
                misfit = torch.bmm(batch.delta, cols.transpose(1, 2)) - batch.g_w
                if batch.known_w is not None:
                    misfit = misfit * batch.known_w
                residual = (z - batch.z_minus_b).square().sum((1, 2)) + misfit.square().sum((1, 2))
        k += 1
        if layer.bias is not None:
            z = z + (batch.params[k][:, :, None] if z.dim() == 3 else batch.params[k])
            k += 1
        a = act(z if isinstance(layer, nn.Linear) else z.view(n, *model.shapes[i + 1]))
    loss = F.cross_entropy(a, batch.target, reduction="sum")  # each client's CE, its own gradient
    dummy = torch.autograd.grad(loss, batch.params, create_graph=True)
    if batch.known is not None:
        dummy = [d * k for d, k in zip(dummy, batch.known)]
    return objective(dummy, batch.shared, x, residual, weights)


def objective(dummy: list[torch.Tensor], directions: list[torch.Tensor], x: torch.Tensor, residual: torch.Tensor,
              weights: tuple[float, float, float]) -> torch.Tensor:
    """The paper's J (Sec. 3) of B images, a (B,) tensor: the only place it is written.

        J(x) = w_cos sum_p (1 - cos(g_p(x), g_p)) + w_tv TV(x) + w_sq ||U x - V||^2,

    g_p(x) the dummy gradient of parameter p in layers l..L-1 (`dummy`, each (B, ...)), g_p
    the shared one, given by its direction (`directions`, each (B, size)), TV the
    anisotropic total variation of the published code, and `residual` layer l's ||U x - V||^2."""
    w_cos, w_tv, w_sq = weights
    # cos(d, g) as d . (g / ||g||) / ||d||, the shared side normalised once per correction: F.cosine_similarity
    # normalises both sides at every step, and its backward's divisions were 15% of cnn6d's step
    cosine = sum(1 - torch.linalg.vecdot(d.flatten(1), u, dim=1) / torch.linalg.vector_norm(d.flatten(1), dim=1)
                 .clamp_min(1e-10) for d, u in zip(dummy, directions))
    tv = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3)) + (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
    return w_cos * cosine + w_tv * tv + w_sq * residual


@functools.cache
def compiled_grad_and_value() -> Callable:
    """One compiled (dJ/dx, J) of J's torch.func form for the whole process: the graphs of
    each (model, layer) are kept, so a sweep compiles each once; labels and images are
    tensor inputs."""
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # its current name, its older one
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime", on CPUs
    objective = functools.partial(hybrid_objective, functional=True)
    return torch.compile(torch.func.grad_and_value(objective, argnums=2), dynamic=False)


def hybrid(models: list[Net], grads: list[list[torch.Tensor]], labels: list[int], settings: AttackSettings,
           rule: CorrectionRule | None = None, memos: list[StepMemo | None] | None = None) -> list[AttackResult]:
    """R-GAP's recursion with each convolution's least-squares solution corrected by
    gradient matching before it is passed down: at every layer (the paper's hybrid), or at
    those where `rule` holds of the ranks (hybrid_free, which records the layers it
    corrected). Several clients' gradients (models of one architecture; one is a batch of
    one) go in step: their recursions layer by layer, each within its own StepMemo
    (`memos`; None: the current one), and the corrections at a layer gradient-matched
    together (gradient_matching)."""
    memos = memos or [None] * len(models)
    corrected: list[list[int]] = [[] for _ in models]
    method = dataclasses.replace(settings, correct_where="", verbose=False)  # what a correction reads

    def correct(todo: list[int], systems: list[LayerSystem], x_hats: list[torch.Tensor]) -> list[torch.Tensor]:
        keys, found = [], []
        for i, system, x_hat in zip(todo, systems, x_hats):
            corrected[i].append(system.layer)
            with memoised(memos[i]):  # a correction met before in this client's cell is taken, not made again
                keys.append(step_key(("correct", system.layer, x_hat, labels[i], method)))
                found.append(taken_step(keys[-1]))
        run = [j for j, value in enumerate(found) if value is MISSING]
        matched = [] if not run else gradient_matching(
            [models[todo[j]] for j in run], [systems[j] for j in run], [x_hats[j] for j in run],
            grads=[grads[todo[j]] for j in run], labels=[labels[todo[j]] for j in run], settings=settings)
        for j, x in zip(run, matched):
            with memoised(memos[todo[j]]):
                found[j] = kept_step(keys[j], x)
        return found
    reconstructions = recursive_reconstruction(models, grads, correct, settings.verbose, rule,
                                               [known_entries(g, settings) for g in grads], memos)
    return [AttackResult(x.to(g[0].device), label,
                         {"rank_deficiency": deficiency} | ({} if rule is None else {"corrected_layers": sorted(c)}))
            for (x, deficiency, _), c, g, label in zip(reconstructions, corrected, grads, labels)]


def attack_hybrid(models: list[Net], grads: list[list[torch.Tensor]], labels: list[int], settings: AttackSettings,
                  memos: list[StepMemo | None]) -> list[AttackResult]:
    """The paper's hybrid: every convolution corrected."""
    return hybrid(models, grads, labels, settings, memos=memos)


# -- hybrid_free: ours, not the paper's -------------------------------------------------
# Where every system from layer l up is full rank, the least-squares solution of layer l
# is determined by the shared gradient (up to conditioning): gradient matching can only move
# it away, and on leaky-ReLU models the inverse activations below multiply that move by
# 1/slope (docs/attacks.md: lenet). So correct only where the systems leave freedom. The
# rule reads the ranks alone, which the attacker has without the image: it stays inside the
# threat model.

CORRECTION_RULES: dict[str, CorrectionRule] = {
    "free-at-or-above": lambda deficiency: any(r < 0 for r in deficiency),  # layer l or one above it
    "free-here": lambda deficiency: deficiency[0] < 0,  # layer l itself
}


def attack_hybrid_free(models: list[Net], grads: list[list[torch.Tensor]], labels: list[int],
                       settings: AttackSettings, memos: list[StepMemo | None]) -> list[AttackResult]:
    """The hybrid, correcting a convolution only where settings.correct_where says the
    systems leave it freedom; elsewhere R-GAP's least-squares solution is passed down."""
    return hybrid(models, grads, labels, settings, CORRECTION_RULES[settings.correct_where], memos)
