"""The numerics that serve the paper's linear systems: minimum-norm least squares with certified
ranks, the certified normal equations, and the memo of steps shared by the attacks of one cell."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
from typing import Callable, Iterator, TYPE_CHECKING

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn

if TYPE_CHECKING:  # annotations alone
    from leakage.paper import ForwardMap, LayerSystem

def solve_min_norm(U: torch.Tensor, V: torch.Tensor, equations: int | None = None) -> tuple[torch.Tensor, int]:
    """Minimum-norm least-squares solution of U x = V (float64) and the rank of U.

    The rank uses numpy's default tolerance: singular values below
    eps * max(m, n) * sigma_max count as zero, m the equations U stands for (its rows, or
    those of the system it reduces: LayerSystem.reduced_matrices). An unknown that appears
    in no equation (a zero column: pixels a strided convolution never reads) is 0 in the
    minimum-norm solution and changes no singular value, so it is left out of the
    factorizations.
    One Householder QR of the taller orientation then reduces the problem to a k x k
    triangular factor with U's singular values (k = min(m, n)); a certified full-rank
    factor is solved directly, any other by `min_norm_square`. Both give
    numpy.linalg.lstsq's rank and solution (tests) in a fraction of its time
    (docs/performance.md).
    """
    m, n = U.shape
    tol = torch.finfo(torch.float64).eps * max(m if equations is None else equations, n)
    used = (U != 0).any(0)
    if not used.all():
        x = U.new_zeros(n)
        x[used], rank = min_norm_solve(U[:, used], V, tol)
        return x, rank
    return min_norm_solve(U, V, tol)


def min_norm_solve(U: torch.Tensor, V: torch.Tensor, tol: float) -> tuple[torch.Tensor, int]:
    """solve_min_norm's solution and rank, with the tolerance given (relative to sigma_max)."""
    m, n = U.shape
    k, tall = min(m, n), m >= n
    a, tau = torch.geqrf(U if tall else U.T)  # U = QR, or U^T = QR
    R = a[:k].triu()
    # Full rank, the usual case for tall systems, is certified by ||R||_F ||R^-1||_F,
    # an upper bound on the condition number, with a 10x margin.
    R_inv = torch.linalg.solve_triangular(R, torch.eye(k, dtype=R.dtype), upper=True)
    full = torch.linalg.matrix_norm(R) * torch.linalg.matrix_norm(R_inv) * tol < 0.1
    if tall:  # ||Ux - V|| = ||Rx - Q^T V|| + const
        b = torch.ormqr(a, tau, V[:, None], transpose=True)[:k]
        y, rank = (R_inv @ b, k) if full else min_norm_square(R, b, tol, upper=True)
        return y[:, 0], rank
    # U = R^T Q^T, so x = Q y with y the minimum-norm solution of R^T y = V
    y, rank = (R_inv.T @ V[:, None], k) if full else min_norm_square(R.T, V[:, None], tol, upper=False)
    return torch.ormqr(a, tau, torch.cat([y, y.new_zeros(n - k, 1)]))[:, 0], rank


def min_norm_square(A: torch.Tensor, b: torch.Tensor, tol: float, upper: bool) -> tuple[torch.Tensor, int]:
    """Minimum-norm least squares for a square triangular A (`upper` or lower); its rank r
    counts sigma_i > tol * sigma_max.

    A QR of A's columns in an order P that puts a numerical null space last,
    A P = Q [T11 T12; 0 T22], certifies r whatever the order: sigma_{r+1} <= ||T22||_F and
    sigma_r >= 1 / ||T11^-1||_F, each with a 10x margin against the tolerance. The
    rank-r system [T11 T12] P^T y = (Q^T b)_r then has a minimum-norm solution through one
    more QR. The order comes from inverse iteration (null_space_last) and an unpivoted QR;
    failing its certificate, from a column-pivoted QR (LAPACK's geqp3, through scipy: it
    was 7x the time of the rest here, docs/performance.md); failing both, the SVD solve
    (gelsd). The systems have exact structural dependencies (C_out^2 rows of G are
    combinations of rows of M), so this path is common.
    """
    scale = torch.linalg.vector_norm(A, dim=0).max()  # the largest column norm, <= sigma_max
    order = null_space_last(A, upper, tol * scale)
    if order is not None:
        perm, r = order
        h, tau = torch.geqrf(A[:, perm])
        solved = certified_solution(h, tau, h.triu(), perm, r, b, tol, scale)
        if solved is not None:
            return solved
    (h, tau), T, perm = scipy.linalg.qr(A.numpy(), mode="raw", pivoting=True, check_finite=False)
    T, perm = torch.from_numpy(np.triu(T)), torch.from_numpy(perm).long()
    diag = T.diagonal().abs()  # diag[0]: the largest column norm
    solved = certified_solution(torch.from_numpy(h), torch.from_numpy(tau), T, perm, int((diag > tol * diag[0]).sum()),
                                b, tol, scale)
    if solved is not None:
        return solved
    sol = torch.linalg.lstsq(A, b, rcond=tol, driver="gelsd")  # the SVD solve
    return sol.solution, int(sol.rank)


def null_space_last(A: torch.Tensor, upper: bool, small: float) -> tuple[torch.Tensor, int] | None:
    """A column order of the triangular A with its numerical null space last, and the rank
    that leaves; None where none is found.

    One step of inverse iteration, X = (A^T A)^-1 Omega by two triangular solves, scales
    each right singular direction of A by 1/sigma^2, so the directions A nearly annihilates
    lead X's singular vectors; X's singular values count those with sigma <= small (an
    estimate: the certificate decides). They span the null space N (m x d); d columns at
    which N's rows are independent (a pivoted QR of the small N^T) complete the others to
    rank m - d, so they go last. The probe widens until it holds more directions than the
    null space.
    """
    m = A.shape[0]
    width = min(m, 32 + 2 * int((A.diagonal().abs() <= small).sum()))
    generator = torch.Generator().manual_seed(0)
    while True:
        omega = torch.randn(m, width, dtype=A.dtype, generator=generator)
        x = torch.linalg.solve_triangular(A, torch.linalg.solve_triangular(A.T, omega, upper=not upper), upper=upper)
        if not torch.isfinite(x).all():  # an exact zero on the diagonal: the pivoted QR decides
            return None
        q, s, _ = torch.linalg.svd(x, full_matrices=False)
        d = int((s * small**2 >= width**0.5).sum())  # s_i ~ |Omega's part| / sigma_i^2, that part ~ width^0.5
        if d < width or width == m:
            break
        width = min(m, 2 * width)
    if d in (0, m):
        return None
    last = torch.from_numpy(scipy.linalg.qr(q[:, :d].T.numpy(), mode="r", pivoting=True, check_finite=False)[1][:d])
    first = torch.ones(m, dtype=torch.bool)
    first[last] = False
    return torch.cat([first.nonzero()[:, 0], last.long()]), m - d


def certified_solution(h: torch.Tensor, tau: torch.Tensor, T: torch.Tensor, perm: torch.Tensor, r: int,
                       b: torch.Tensor, tol: float, scale: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """min_norm_square's solution from a QR of A's permuted columns (Householder h, tau; T
    its upper triangle), where rank r is certified against `scale` <= sigma_max; else None."""
    T11_inv = torch.linalg.solve_triangular(T[:r, :r], torch.eye(r, dtype=T.dtype), upper=True)
    if not (torch.linalg.matrix_norm(T[r:, r:]) <= 0.1 * tol * scale
            and 1 / torch.linalg.matrix_norm(T11_inv) >= 10 * tol * torch.linalg.matrix_norm(T)):
        return None
    c = torch.ormqr(h, tau, b, transpose=True)
    h3, tau3 = torch.geqrf(T[:r].T)  # [T11 T12]^T = Q3 R3, so z = Q3 R3^-T c_r
    w = torch.linalg.solve_triangular(h3[:r].triu().T, c[:r], upper=False)
    z = torch.ormqr(h3, tau3, torch.cat([w, w.new_zeros(len(perm) - r, 1)]))
    return z.new_empty(z.shape).index_copy_(0, perm, z), r


def gram_solution(system: LayerSystem, conv: nn.Conv2d, forward: ForwardMap,
                  equations: int) -> tuple[torch.Tensor, int] | None:
    """solve_min_norm's answer for a system with more equations than unknowns that its
    normal equations certify full rank, or None (the QR decides).

    U^T U = M^T M + G^T G: M^T M depends on the weights alone (forward.gram), and G^T G is
    the sum over the patch entries c of delta^T delta (P x P) scattered to the pixels
    that entry reads, so neither U nor its QR is formed (a tall QR costs 2 m n^2 flops,
    this about C_in k^2 P^2 scattered entries and two Choleskys' n^3 / 3).

    Full rank is certified as rigorously as min_norm_solve's, by a Cholesky of the
    computed Gram matrix shifted down by s = (10 tol)^2 ||U||_F^2 + 2 d, with
    d = gamma_{m+n+1} ||U||_F^2 bounding both the Gram matrix's rounding and the
    factorization's backward error (Higham, Accuracy and Stability, Thms 3.5 and 10.3):
    where it succeeds, lambda_min(U^T U) >= s - 2 d, so sigma_min(U) >= 10 tol ||U||_F >=
    10 tol sigma_max, and numpy's rank is n too (Rump's test for positive definiteness).
    One step of refinement against U's residual brings the solution to the QR's accuracy
    (tests: numpy's to 1e-12; the subset's layers: the QR's to 5e-14). The subset's tall
    systems have condition numbers below 3000 (docs/performance.md). Not under pruning (its
    surviving rows break the structure).
    """
    idx, n = forward.idx, forward.M.shape[1]
    if (forward.gram is None or system.known is not None or equations < n
            or idx.numel() * idx.shape[1] > equations * n * n / 128):  # the scatter would cost more than a QR
        return None
    padded = torch.where(idx >= 0, idx, n)  # padding reads a pixel n that is dropped
    delta = system.delta.double().cpu().reshape(conv.out_channels, -1)  # (C_out, P)
    A = forward.gram.new_zeros(n + 1, n + 1)
    D = delta.T @ delta
    for entry in padded:  # G^T G, one patch entry (c, i, j) at a time: its P pixels, delta^T delta among them
        A.index_put_((entry[:, None], entry[None, :]), D, accumulate=True)
    A = A[:n, :n] + forward.gram
    used = A.diagonal() > 0  # an unknown in no equation is 0 in the minimum-norm solution
    A = A[used][:, used]
    eps, k = torch.finfo(torch.float64).eps, equations + n + 1
    tol = eps * max(equations, n)
    frobenius_sq = A.diagonal().sum()  # ||U||_F^2
    shift = ((10 * tol) ** 2 + 2 * 1.01 * k * eps / (1 - k * eps)) * frobenius_sq
    if torch.linalg.cholesky_ex(A - shift * torch.eye(len(A), dtype=A.dtype)).info != 0:
        return None
    L = torch.linalg.cholesky(A)
    g_w = system.g_w.double().cpu().reshape(conv.out_channels, -1)
    z = system.z_minus_b.flatten().double().cpu()

    def normal_side(r_m: torch.Tensor, r_g: torch.Tensor) -> torch.Tensor:  # U^T [r_m; r_g], r_g as gW
        out = forward.M.T @ r_m
        return out + out.new_zeros(n + 1).index_add_(0, padded.flatten(), (r_g.T @ delta).flatten())[:n]

    def solve(b: torch.Tensor) -> torch.Tensor:
        x = b.new_zeros(n)
        x[used] = torch.cholesky_solve(b[used, None], L)[:, 0]
        return x
    x = solve(normal_side(z, g_w))
    cols = torch.cat([x, x.new_zeros(1)])[padded]  # (C_in k k, P)
    x = x + solve(normal_side(z - forward.M @ x, g_w - delta @ cols.T))  # one step of refinement
    return x, int(used.sum())


# -- Work shared by the attacks of one cell ------------------------------------------------
# R-GAP, the hybrid and hybrid_free run one recursion on one shared gradient. The top
# layer's step is the same for all three; so is every step hybrid_free leaves to R-GAP until
# its first correction, and every correction it makes from the input the hybrid corrected.
# Each step is a function of its inputs alone (the model and the gradient, fixed within a
# cell; the layer and the estimate passed down; a correction also the label and the
# method's settings): a step met again within a cell is taken from the first time, not run
# twice, and its numbers are those of running it again, to the bit.


class StepMemo:
    """The steps of one cell's attacks, by their inputs: each step's value; `computed` counts
    the steps run, `taken` those taken again."""

    def __init__(self) -> None:
        self.steps: dict[tuple, object] = {}
        self.computed = self.taken = 0


MEMO: contextvars.ContextVar[StepMemo | None] = contextvars.ContextVar("shared_steps", default=None)


def digest(value: object) -> object:
    """A step's input as a key: a tensor by its bytes (shape and dtype too), anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    t = value.detach().cpu().contiguous()
    return hashlib.sha1(f"{tuple(t.shape)}{t.dtype}".encode() + t.numpy().tobytes()).hexdigest()


def memo_step(inputs: tuple, compute: Callable[[], object]) -> object:
    """`compute()`, or, within a cell, its value the first time these `inputs` were met (the
    tensors among them hashed only within a cell)."""
    key = step_key(inputs)
    value = taken_step(key)
    return kept_step(key, compute()) if value is MISSING else value


MISSING = object()  # a step not met before


def step_key(inputs: tuple) -> tuple | None:
    """A step's key within the current cell's StepMemo; None outside a cell."""
    return None if MEMO.get() is None else tuple(digest(v) for v in inputs)


def taken_step(key: tuple | None) -> object:
    """The step's value from the first time it was met, or MISSING."""
    shared = MEMO.get()
    if key is None or key not in shared.steps:
        return MISSING
    shared.taken += 1
    return shared.steps[key]


def kept_step(key: tuple | None, value: object) -> object:
    """`value`, kept as the step's within the current cell."""
    if key is not None:
        MEMO.get().computed += 1
        MEMO.get().steps[key] = value
    return value


@contextlib.contextmanager
def memoised(steps: StepMemo | None) -> Iterator[None]:
    """Within it, the steps met are `steps`' (None: the current cell's, whatever they are).
    Clients attacked together (recursive_reconstruction) each keep their own."""
    if steps is None:
        yield
        return
    token = MEMO.set(steps)
    try:
        yield
    finally:
        MEMO.reset(token)
