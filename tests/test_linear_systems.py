"""The linear systems of the recursion, each piece against an independent computation."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from leakage.activations import activation_derivative, inverse_activation
from leakage.modules import build_model
from leakage.paper import (
    FORWARD_MAPS, LayerSystem, client_gradient, conv_matrix, forward_map, grad_matrix, invert_fc, security_index
)
from leakage.solvers import certified_solution, gram_solution, null_space_last, solve_min_norm

GRID = list(itertools.product([1, 3, 4], [1, 2], [0, 1, 2], [(1, 2), (3, 4)], [False, True]))


@pytest.mark.parametrize("k,stride,pad,channels,bias", GRID)
def test_conv_matrix_reproduces_conv2d(k, stride, pad, channels, bias):
    torch.manual_seed(k * 100 + stride * 10 + pad)
    conv = nn.Conv2d(*channels, k, stride, pad, bias=bias).double()
    x = torch.randn(1, channels[0], 9, 8, dtype=torch.float64)
    M = conv_matrix(conv, (channels[0], 9, 8))
    z = M @ x.flatten()
    if bias:  # M is the linear part; the bias is subtracted from the target instead
        z = z + conv.bias.detach().repeat_interleave(z.numel() // channels[1])
    torch.testing.assert_close(z, conv(x).flatten(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k,stride,pad,channels,bias", GRID)
def test_grad_matrix_reproduces_autograd_weight_gradient(k, stride, pad, channels, bias):
    torch.manual_seed(k * 100 + stride * 10 + pad + 1)
    conv = nn.Conv2d(*channels, k, stride, pad, bias=bias).double()
    x = torch.randn(1, channels[0], 9, 8, dtype=torch.float64)
    out = conv(x)
    delta = torch.randn_like(out)  # dL/dz for a loss L = <delta, z>
    (g_w,) = torch.autograd.grad((out * delta).sum(), [conv.weight])
    G = grad_matrix(conv, (channels[0], 9, 8), delta)
    torch.testing.assert_close(G @ x.flatten(), g_w.flatten(), rtol=0, atol=1e-12)


def test_residual_without_matrices_equals_dense_system():
    model = build_model("cnn3_c1").double()
    out_shape = (1, *model.shapes[2])  # layer 1: 6x30x30 -> 3x14x14
    torch.manual_seed(0)
    system = LayerSystem(1, torch.randn(out_shape, dtype=torch.float64),
                           torch.randn(out_shape, dtype=torch.float64),
                           torch.randn(3, 6, 4, 4, dtype=torch.float64))
    U, V = system.matrices(model)
    x = torch.randn(1, *model.shapes[1], dtype=torch.float64)
    dense = (U @ x.flatten() - V).square().sum()
    z, residual = system.forward_and_residual(model, x)
    torch.testing.assert_close(residual, dense, rtol=1e-10, atol=0)
    torch.testing.assert_close(z, model.layers[1](x))  # the layer's own forward


def _random_rank(m, n, r, seed):
    g = np.random.default_rng(seed)
    return g.standard_normal((m, r)) @ g.standard_normal((r, n))


@pytest.mark.parametrize("U", [
    np.random.default_rng(1).standard_normal((60, 25)),  # tall, full rank: QR path
    np.random.default_rng(2).standard_normal((25, 60)),  # wide, full rank
    _random_rank(60, 25, 20, 3),  # tall, rank-deficient: SVD path
    _random_rank(25, 60, 18, 4),  # wide with dependent rows
    _random_rank(40, 40, 31, 6),  # square, rank-deficient: null-space order
    np.hstack([_random_rank(25, 50, 18, 7), np.zeros((25, 10))]),  # unknowns in no equation
    np.hstack([np.zeros((60, 3)), _random_rank(60, 22, 15, 8)]),  # the same, tall
    np.vstack([np.eye(20) * 1e-13, np.eye(20)]),  # tiny block: no effect on the rank
    np.diag(np.r_[np.ones(10), 1e-20 * np.ones(5)]),  # below numpy's tolerance
], ids=["tall", "wide", "tall-deficient", "wide-deficient", "square-deficient", "zero-columns", "zero-columns-tall",
        "tiny-block", "below-tol"])
def test_solve_min_norm_matches_numpy_lstsq(U):
    V = np.random.default_rng(5).standard_normal(U.shape[0])
    x, rank = solve_min_norm(torch.from_numpy(U), torch.from_numpy(V))
    x_ref, _, rank_ref, _ = np.linalg.lstsq(U, V, rcond=None)
    assert rank == rank_ref == np.linalg.matrix_rank(U)
    np.testing.assert_allclose(x.numpy(), x_ref, rtol=1e-8, atol=1e-8)


def test_null_space_order_reveals_the_rank():
    """The order min_norm_square tries first: the null space's columns last, the rank certified without geqp3."""
    A = torch.from_numpy(np.linalg.qr(_random_rank(50, 50, 41, 9))[1])  # upper triangular, rank 41
    tol = np.finfo(np.float64).eps * 50
    scale = torch.linalg.vector_norm(A, dim=0).max()
    perm, rank = null_space_last(A, True, tol * scale)
    assert rank == np.linalg.matrix_rank(A.numpy()) == 41 and sorted(perm.tolist()) == list(range(50))
    h, tau = torch.geqrf(A[:, perm])
    b = torch.from_numpy(np.random.default_rng(10).standard_normal((50, 1)))
    x, r = certified_solution(h, tau, h.triu(), perm, rank, b, tol, scale)
    np.testing.assert_allclose(x.numpy(), np.linalg.lstsq(A.numpy(), b.numpy(), rcond=None)[0], rtol=1e-8, atol=1e-8)


# Layer 0 has a tall M (16x4x4 outputs of 3x8x8 inputs); layer 1 more output channels (32) than positions (16).
SMALL = "16k3s2p1-tanh,32k3s1p1-tanh,fc-id"


@pytest.mark.parametrize("layer,pruned", [(0, False), (1, False), (1, True)])
def test_reduced_system_keeps_the_solution_and_rank(layer, pruned):
    model = build_model(SMALL, shape=(3, 8, 8)).double()
    torch.manual_seed(layer)
    out_shape, conv = (1, *model.shapes[layer + 1]), model.layers[layer]
    delta = torch.randn(out_shape, dtype=torch.float64)
    delta[:, :3] *= 0  # dead channels: G's rank drops, as under ReLU
    system = LayerSystem(layer, torch.randn(out_shape, dtype=torch.float64), delta,
                           torch.randn(conv.weight.shape, dtype=torch.float64),
                           torch.rand(conv.weight.shape) < 0.7 if pruned else None)
    U, V = system.matrices(model)
    U_r, V_r = system.reduced_matrices(model, forward_map(conv, model.shapes[layer]))
    equations = system.equations()
    assert equations == U.shape[0] and U_r.shape[0] < U.shape[0] and U_r.shape[1] == U.shape[1]
    torch.testing.assert_close(torch.linalg.svdvals(U_r), torch.linalg.svdvals(U), rtol=1e-10, atol=1e-10)
    x, rank = solve_min_norm(U_r, V_r, equations)
    x_ref, _, rank_ref, _ = np.linalg.lstsq(U.numpy(), V.numpy(), rcond=None)
    assert rank == rank_ref
    np.testing.assert_allclose(x.numpy(), x_ref, rtol=1e-8, atol=1e-8)


# Tall systems: SMALL's layer 0 with padding (pixels read by one patch entry or several), and
# a stride-2 convolution that leaves pixels unread (zero columns).
TALL = [(SMALL, 0), ("8k3s2p0-tanh,fc-id", 0)]


@pytest.mark.parametrize("arch,layer", TALL)
def test_gram_solution_is_numpys_solution_and_rank(arch, layer):
    """A tall full-rank system's normal equations, certified, give numpy's rank and its
    solution to 1e-12, its unread pixels 0."""
    model = build_model(arch, shape=(3, 8, 8)).double()
    torch.manual_seed(layer)
    out_shape, conv = (1, *model.shapes[layer + 1]), model.layers[layer]
    system = LayerSystem(layer, torch.randn(out_shape, dtype=torch.float64),
                           torch.randn(out_shape, dtype=torch.float64),
                           torch.randn(conv.weight.shape, dtype=torch.float64))
    U, V = system.matrices(model)
    solved = gram_solution(system, conv, forward_map(conv, model.shapes[layer]), system.equations())
    assert solved is not None, "certified"
    x, rank = solved
    x_ref, _, rank_ref, _ = np.linalg.lstsq(U.numpy(), V.numpy(), rcond=None)
    assert rank == rank_ref < U.shape[1] if arch != SMALL else rank == rank_ref == U.shape[1]
    np.testing.assert_allclose(x.numpy(), x_ref, rtol=0, atol=1e-12 * np.abs(x_ref).max())


def test_gram_solution_declines_what_it_cannot_certify():
    """Rank-deficient (dead output channels leave too few equations of G to fill the
    columns), or full rank but too ill-conditioned for normal equations to certify (sigma_min
    1e-7 of sigma_max: full rank to numpy, and the Gram matrix still has a Cholesky factor):
    None, and the QR decides."""
    model = build_model("8k3s2p1-tanh,fc-id", shape=(3, 8, 8)).double()
    conv, shape = model.layers[0], model.shapes[0]
    out_shape = (1, *model.shapes[1])
    z, g_w = torch.randn(out_shape, dtype=torch.float64), torch.randn(conv.weight.shape, dtype=torch.float64)
    dead = LayerSystem(0, z, torch.zeros(out_shape, dtype=torch.float64), g_w)  # G = 0: rank 128 of 192
    assert dead.equations() >= 192 and gram_solution(dead, conv, forward_map(conv, shape), dead.equations()) is None
    model = build_model("16k1s1p0-tanh,fc-id", shape=(3, 8, 8)).double()
    conv, shape = model.layers[0], model.shapes[0]
    with torch.no_grad():  # a 1x1 convolution: M is W at every pixel, and W's singular values are 1, 1, 1e-7
        left, right = (torch.linalg.qr(torch.randn(k, 3, dtype=torch.float64))[0] for k in (16, 3))
        conv.weight.copy_((left @ torch.diag(torch.tensor([1.0, 1.0, 1e-7], dtype=torch.float64)) @ right.T)
                          .view_as(conv.weight))
    out_shape = (1, *model.shapes[1])
    weak = LayerSystem(0, torch.randn(out_shape, dtype=torch.float64),
                         1e-12 * torch.randn(out_shape, dtype=torch.float64),
                         torch.randn(conv.weight.shape, dtype=torch.float64))
    U, _ = weak.matrices(model)
    s = torch.linalg.svdvals(U)
    assert np.linalg.matrix_rank(U.numpy()) == U.shape[1] and s[-1] / s[0] < 1e-6  # full rank, to numpy
    assert torch.linalg.cholesky_ex(U.T @ U).info == 0  # what the shift, not the factorization, turns down
    assert gram_solution(weak, conv, forward_map(conv, shape), weak.equations()) is None


def test_forward_map_is_built_once_per_weights(monkeypatch):
    model = build_model(SMALL, shape=(3, 8, 8)).double()
    conv, shape = model.layers[0], model.shapes[0]
    FORWARD_MAPS.clear()
    first = forward_map(conv, shape)
    assert forward_map(conv, shape) is first  # the images of a model share it
    with torch.no_grad():
        conv.weight.add_(1.0)  # new weights (training, another model): a new M, never the old one
    torch.testing.assert_close(forward_map(conv, shape).M, conv_matrix(conv, shape), rtol=0, atol=0)
    monkeypatch.setattr("leakage.paper.FORWARD_MAPS_BYTES", 0)  # over the budget: only the newest is kept
    forward_map(model.layers[1], model.shapes[1])
    assert len(FORWARD_MAPS) == 1


ACTIVATIONS = [nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.01), nn.LeakyReLU(0.2), nn.Softplus(), nn.Softplus(beta=2.5),
               nn.Identity()]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
def test_inverse_activation_then_activation_is_identity(act):
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    a = act(z)
    torch.testing.assert_close(act(inverse_activation(act, a)), a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
def test_inverse_activation_is_finite_out_of_range(act):
    a = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 800.0], dtype=torch.float64)
    assert torch.isfinite(inverse_activation(act, a)).all()


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
def test_activation_derivative_matches_autograd(act):
    z = torch.linspace(-4, 4, 100, dtype=torch.float64, requires_grad=True)  # 0 is not a grid point
    (ref,) = torch.autograd.grad(act(z).sum(), [z])
    torch.testing.assert_close(activation_derivative(act, z.detach()), ref, rtol=1e-12, atol=1e-12)


def test_fc_inversion_recovers_the_input(chelsea):
    for name in ["cnn2_c1", "cnn2_c0", "cnn3_c13"]:  # identity, tanh and sigmoid after fc
        model = build_model(name)
        grads = client_gradient(model, chelsea.x, chelsea.label)
        feats = chelsea.x
        for layer, act in zip(model.layers[:-1], model.acts[:-1]):
            feats = act(layer(feats))
        a, dl_da = invert_fc(model.layers[-1], grads[-2], grads[-1])
        torch.testing.assert_close(a.float(), feats.flatten().detach(), rtol=1e-5, atol=1e-6)
        # dL/da is W^T dL/dz: compare with autograd on the true features
        feats = feats.detach().flatten(1).requires_grad_()
        loss = F.cross_entropy(model.acts[-1](model.layers[-1](feats)), torch.tensor([chelsea.label]))
        (ref,) = torch.autograd.grad(loss, [feats])
        torch.testing.assert_close(dl_da.float(), ref.flatten(), rtol=1e-5, atol=1e-8)


def test_security_index_formula():
    assert security_index([0]) == 0
    assert security_index([-5]) == -5  # one convolution: S = r_0
    # L - 1 = 3 convolutions: weights 3/3, 2/3, 1/3
    assert security_index([-3, -3, -3]) == -3 - 2 - 1
    assert security_index([0, -9316, 0]) == round(-9316 * 2 / 3)
    assert security_index([-10, 0]) == -10  # layer 0 weighs 2/2, layer 1 weighs 1/2
    assert security_index([0, -10]) == -5
