"""The attacks of SPEC 6 on small models with small iteration counts."""
import dataclasses
import inspect
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hybrid as H
from conftest import run_script

QUICK = H.Config(**H.QUICK_ITERS)


def true_system(model, x, label, layer):
    """Layer `layer`'s equations built from the client's own forward pass (test only)."""
    feats = x
    for conv, act in zip(model.layers[:layer], model.acts[:layer]):
        feats = act(conv(feats))
    z = model.layers[layer](feats)
    out = model(model.acts[layer](z), layer + 1)
    loss = F.cross_entropy(out, torch.tensor([label]))
    delta, g_w = torch.autograd.grad(loss, [z, model.layers[layer].weight])
    bias = model.layers[layer].bias
    target = z if bias is None else z - bias.view(1, -1, 1, 1)
    return feats.detach(), H.LayerSystem(layer, target.detach(), delta, g_w)


@pytest.mark.parametrize("name,layer", [("cnn3_c1", 0), ("cnn3_c1", 1), ("lenet", 1), ("cnn3_c12", 0)])
def test_hybrid_objective_vanishes_at_the_true_layer_input(name, layer, chelsea):
    model = H.build_model(name)
    grads = H.client_gradient(model, chelsea.x, chelsea.label)
    x_true, system = true_system(model, chelsea.x, chelsea.label, layer)
    target = torch.tensor([chelsea.label])
    matching = H.hybrid_objective(model, system, x_true, grads, target, (1.0, 0.0, 0.0))
    linear = H.hybrid_objective(model, system, x_true, grads, target, (0.0, 0.0, 1.0))
    assert abs(matching.item()) < 1e-5
    assert linear.item() < 1e-8 * (system.z.square().sum() + system.g_w.square().sum()).item()
    # and both are far from zero elsewhere, so the test can fail
    noisy = x_true + 0.1 * torch.randn_like(x_true)
    assert H.hybrid_objective(model, system, noisy, grads, target, (1.0, 0.0, 1.0)).item() > 1e-3


def near_the_true_input(model, sample, layer):
    """The shared gradient, layer `layer`'s equations and a point 0.05-noise away from its
    true input, where the hybrid objective and its gradient are far from zero."""
    grads = H.client_gradient(model, sample.x, sample.label)
    x_true, system = true_system(model, sample.x, sample.label, layer)
    return grads, system, (x_true + 0.05 * torch.randn_like(x_true)).requires_grad_()


def assert_same_value_and_gradient(expected, got):
    (grad, value), (other_grad, other_value) = expected, got
    assert value.item() > 1e-3 and grad.abs().max() > 1e-3
    assert abs(other_value.item() - value.item()) < 1e-5 * value.item()
    assert torch.allclose(other_grad, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


@pytest.mark.parametrize("name,layer", [("lenet", 1), ("cnn3_c12", 0)])
def test_functional_objective_is_the_autograd_one(name, layer, chelsea):
    """The torch.func form (what --compile traces) against the double backward, uncompiled;
    lenet's convolutions have biases, so the parameter order is checked too."""
    model = H.build_model(name)
    grads, system, x = near_the_true_input(model, chelsea, layer)
    weights = (1.0, 1.0, 0.1)
    eager = H.hybrid_gradient(model, system, grads, chelsea.label, weights, compile=False)(x)
    functional = torch.func.grad_and_value(H.hybrid_objective, argnums=2)(
        model, system, x.detach(), grads, torch.tensor([chelsea.label]), weights, True)
    assert_same_value_and_gradient(eager, functional)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_hybrid_gradient_is_autograds(samples):
    """--compile: torch.func + torch.compile give the double backward's value and gradient,
    also on a second image and label of the same shapes (nothing of the first is baked in)."""
    model = H.build_model("cnn3_c1")
    for sample in samples[3], samples[0]:
        grads, system, x = near_the_true_input(model, sample, 1)
        eager, compiled = (H.hybrid_gradient(model, system, grads, sample.label, (1.0, 1.0, 0.1), compile=c)(x)
                           for c in (False, True))
        assert_same_value_and_gradient(eager, compiled)


def test_hybrid_schedule_is_the_papers_table():
    cfg = H.Config()
    assert H.hybrid_schedule(0, cfg) == (1.0, 1.0, 0.05, 10000)
    assert H.hybrid_schedule(1, cfg) == (1.0, 1.0, 0.1, 8000)
    assert H.hybrid_schedule(2, cfg) == (10.0, 0.1, 1.0, 1000)
    assert H.hybrid_schedule(5, cfg) == (10.0, 0.1, 1.0, 1000)


def run(name, attack, sample, cfg=QUICK):
    model = H.build_model(name)
    grads = H.client_gradient(model, sample.x, sample.label)
    H.seed_everything(cfg.seed)
    result = H.ATTACKS[attack](model, grads, H.recover_label(grads), cfg)
    return result, H.score(H.to_image(sample.x), H.to_image(result.x))


def test_hybrid_beats_rgap_where_rgap_is_not_exact(chelsea):
    cfg = dataclasses.replace(QUICK, hybrid_iters_first=300)
    _, rgap = run("cnn2_c2", "rgap", chelsea, cfg)
    hybrid_result, hybrid = run("cnn2_c2", "hybrid", chelsea, cfg)
    assert hybrid["psnr"] > rgap["psnr"] + 1
    assert hybrid_result.info["rank_deficiency"] == [-1470]


def test_hybrid_stays_exact_enough_on_a_full_rank_model(chelsea):
    cfg = dataclasses.replace(QUICK, hybrid_iters_first=300)
    _, hybrid = run("cnn2_c1", "hybrid", chelsea, cfg)
    assert hybrid["psnr"] > 25


@pytest.mark.parametrize("attack", ["dlg", "idlg", "cosine"])
def test_optimisation_attacks_lower_their_objective(attack, chelsea):
    # L-BFGS at lr 1 without line search (as DLG has it) can jump uphill and stay
    # there on a saturated tanh; on cnn4_c2 its first steps descend.
    cfg = dataclasses.replace(QUICK, dlg_iters=5, cosine_iters=50)
    result, metrics = run("cnn4_c2", attack, chelsea, cfg)
    assert result.x.shape == (1, 3, 32, 32) and torch.isfinite(result.x).all()
    assert result.info["objective_end"] < result.info["objective_start"]
    assert np.isfinite(metrics["psnr"]) and np.isfinite(metrics["ssim"])
    if attack in ("idlg", "cosine"):
        assert result.label == chelsea.label


def test_true_label_is_handed_to_every_attack(chelsea):
    model = H.build_model("cnn2_c4")
    grads = H.client_gradient(model, chelsea.x, 7)  # the client trains the cat as class 7
    cfg = dataclasses.replace(QUICK, true_label=True, dlg_iters=2)
    H.seed_everything(cfg.seed)
    assert H.attack_dlg(model, grads, 7, cfg).label == 7  # DLG optimises the image only


def test_attacks_never_see_the_private_image(chelsea):
    for name, attack in H.ATTACKS.items():
        params = list(inspect.signature(attack).parameters)
        assert params == ["model", "grads", "label", "cfg"], name
    model = H.build_model("cnn2_c4")
    x = chelsea.x.clone()
    grads = H.client_gradient(model, x, chelsea.label)
    cfg = dataclasses.replace(QUICK, dlg_iters=2, cosine_iters=10, hybrid_iters_first=10)

    def everything():
        out = []
        for attack in H.ATTACKS.values():
            H.seed_everything(cfg.seed)
            out.append(attack(model, grads, 3, cfg).x)
        return out

    before = everything()
    x.copy_(torch.rand_like(x) - 0.5)  # the client's image is overwritten with noise
    for a, b in zip(before, everything()):
        assert torch.equal(a, b)


def test_every_attack_is_reseeded(chelsea):
    """Any subset in any order gives the same numbers."""
    model = H.build_model("cnn2_c4")
    grads = H.client_gradient(model, chelsea.x, chelsea.label)
    cfg = dataclasses.replace(QUICK, dlg_iters=2, cosine_iters=10)
    results = {}
    for order in (["dlg", "cosine"], ["cosine", "dlg"]):
        for name in order:
            H.seed_everything(cfg.seed)
            results.setdefault(name, []).append(H.ATTACKS[name](model, grads, 3, cfg).x)
    assert all(torch.equal(*pair) for pair in results.values())


def test_all_five_attacks_end_to_end(tmp_path):
    out = run_script("--quick", "--source", "samples", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (folder,) = list(tmp_path.iterdir())
    results = json.loads((folder / "results.json").read_text())
    (run_,) = results["runs"]
    assert list(run_["attacks"]) == ["rgap", "dlg", "idlg", "cosine", "hybrid"]
    for name, entry in run_["attacks"].items():
        assert np.isfinite([entry["psnr"], entry["ssim"], entry["seconds"]]).all(), name
        assert np.load(folder / entry["npy"]).shape == (32, 32, 3)
    assert run_["attacks"]["idlg"]["label_correct"]
    assert run_["attacks"]["hybrid"]["psnr"] > run_["attacks"]["rgap"]["psnr"]  # cnn4_c2
    assert (folder / "comparison.png").stat().st_size > 20_000
