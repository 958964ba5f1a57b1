"""R-GAP: exact where the architecture allows it, consistent where it does not."""
import numpy as np
import torch

from leakage.data import to_image
from leakage.metrics import score
from leakage.modules import build_model
from leakage.paper import client_gradient, invert_fc, layer_system, recursive_reconstruction


def test_rgap_is_exact_on_a_full_rank_model(chelsea):
    model = build_model("cnn2_c5")  # 3072 forward equations (padding 1) on 3072 unknowns
    grads = client_gradient(model, chelsea.x, chelsea.label)
    ((x, deficiency, _),) = recursive_reconstruction([model], [grads])
    assert deficiency == [0]
    assert score(to_image(chelsea.x), to_image(x))["psnr"] > 60


def test_rgap_on_a_rank_deficient_model_satisfies_the_equations(chelsea, cnn2_c2_rgap):
    model, grads, x, deficiency = cnn2_c2_rgap
    assert deficiency[0] < 0
    # The least-squares estimate fits both constraint sets as well as the true image does
    z_true = model.layers[0](chelsea.x).double()
    a_hat, dl_da = invert_fc(model.layers[-1], grads[-2], grads[-1])
    system = layer_system(model, 0, a_hat, dl_da, [g.double() for g in grads])
    U, V = system.matrices(model)
    residual = (U @ x.double().flatten() - V).norm() / V.norm()
    assert residual < 1e-4
    torch.testing.assert_close(system.z_minus_b.float(), z_true.float(), rtol=1e-3, atol=1e-3)
    # ... but it is not the image: a (-r)-dimensional family fits
    assert score(to_image(chelsea.x), to_image(x))["psnr"] < 40


def test_rank_deficiency_counts_the_unknowns_left_free(cnn2_c2_rgap):
    """cnn2_c2: 1350 forward + 288 gradient equations on 3072 unknowns, rank < 1638."""
    model, grads, _, deficiency = cnn2_c2_rgap
    a_hat, dl_da = invert_fc(model.layers[-1], grads[-2], grads[-1])
    U, V = layer_system(model, 0, a_hat, dl_da, [g.double() for g in grads]).matrices(model)
    assert U.shape == (1350 + 288, 3072)
    assert deficiency == [np.linalg.matrix_rank(U.numpy()) - 3072]
