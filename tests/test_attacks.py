"""The attacks on small models with small iteration counts, and the experiment that runs them."""
import functools
import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leakage.attacks import ATTACKS
from leakage.data import PrivateImage, to_image
from leakage.experiment import Answer, share_and_attack
from leakage.matching import cosine_distance, dummy_gradient, squared_distance, total_variation
from leakage.metrics import score
from leakage.models import gradients_from
from leakage.modules import build_model
from leakage.paper import (
    LayerSystem, client_gradient, gradient_matching, hybrid_grad_and_value, hybrid_objective, hybrid_schedule,
    recover_label
)
from leakage.runtime import PUBLISHED_SEED, seed_everything
from leakage.settings import AttackSettings, quick_iterations
from conftest import run_script

QUICK = AttackSettings(**quick_iterations())


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
    return feats.detach(), LayerSystem(layer, target.detach(), delta, g_w)


@pytest.mark.parametrize("name,layer", [("cnn3_c1", 0), ("cnn3_c1", 1), ("lenet", 1), ("cnn3_c12", 0)])
def test_hybrid_objective_vanishes_at_the_true_layer_input(name, layer, chelsea):
    model = build_model(name)
    grads = client_gradient(model, chelsea.x, chelsea.label)
    x_true, system = true_system(model, chelsea.x, chelsea.label, layer)
    target, shared = torch.tensor([chelsea.label]), gradients_from(model, grads, layer)
    matching = hybrid_objective(model, system, x_true, shared, target, (1.0, 0.0, 0.0))
    linear = hybrid_objective(model, system, x_true, shared, target, (0.0, 0.0, 1.0))
    assert abs(matching.item()) < 1e-5
    assert linear.item() < 1e-8 * (system.z_minus_b.square().sum() + system.g_w.square().sum()).item()
    # and both are far from zero elsewhere, so the test can fail
    noisy = x_true + 0.1 * torch.randn_like(x_true)
    assert hybrid_objective(model, system, noisy, shared, target, (1.0, 0.0, 1.0)).item() > 1e-3


def near_the_true_input(model, sample, layer):
    """The shared gradient, layer `layer`'s equations and a point 0.05-noise away from its
    true input, where the hybrid objective and its gradient are far from zero."""
    grads = client_gradient(model, sample.x, sample.label)
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
    model = build_model(name)
    grads, system, x = near_the_true_input(model, chelsea, layer)
    weights, shared = (1.0, 1.0, 0.1), gradients_from(model, grads, layer)
    eager = hybrid_grad_and_value(model, system, shared, chelsea.label, weights, compile=False)(x)
    functional = torch.func.grad_and_value(functools.partial(hybrid_objective, functional=True), argnums=2)(
        model, system, x.detach(), shared, torch.tensor([chelsea.label]), weights)
    assert_same_value_and_gradient(eager, functional)


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile needs a C++ compiler on the CPU")
@pytest.mark.slow
def test_compiled_hybrid_gradient_is_autograds(photographs):
    """--compile: torch.func + torch.compile give the double backward's value and gradient,
    also on a second image and label of the same shapes (nothing of the first is baked in)."""
    model = build_model("cnn3_c1")
    for sample in photographs[3], photographs[0]:
        grads, system, x = near_the_true_input(model, sample, 1)
        shared = gradients_from(model, grads, 1)
        eager, compiled = (hybrid_grad_and_value(model, system, shared, sample.label, (1.0, 1.0, 0.1), compile=c)(x)
                           for c in (False, True))
        assert_same_value_and_gradient(eager, compiled)


def test_hybrid_schedule_is_the_papers_table():
    settings = AttackSettings()  # the defaults are the paper's iteration counts
    assert hybrid_schedule(0, settings) == (1.0, 1.0, 0.05, 10000)
    assert hybrid_schedule(1, settings) == (1.0, 1.0, 0.1, 8000)
    assert hybrid_schedule(2, settings) == (10.0, 0.1, 1.0, 1000)
    assert hybrid_schedule(5, settings) == (10.0, 0.1, 1.0, 1000)


def run(name, attack, sample, settings=QUICK):
    model = build_model(name)
    grads = client_gradient(model, sample.x, sample.label)
    seed_everything(PUBLISHED_SEED)
    result = ATTACKS[attack].run(model, grads, recover_label(grads), settings)
    return result, score(to_image(sample.x), to_image(result.x))


def test_hybrid_beats_rgap_where_rgap_is_not_exact(chelsea, cnn2_c2_rgap):
    settings = dataclasses.replace(QUICK, hybrid_iters_first=300)
    rgap = score(to_image(chelsea.x), to_image(cnn2_c2_rgap[2]))
    hybrid_result, hybrid = run("cnn2_c2", "hybrid", chelsea, settings)
    assert hybrid["psnr"] > rgap["psnr"] + 1
    assert hybrid_result.info["rank_deficiency"] == [-1470]


@pytest.mark.slow
def test_hybrid_stays_exact_enough_on_a_full_rank_model(chelsea):
    settings = dataclasses.replace(QUICK, hybrid_iters_first=300)
    _, hybrid = run("cnn2_c1", "hybrid", chelsea, settings)
    assert hybrid["psnr"] > 25


@pytest.mark.parametrize("attack", ["dlg", "idlg", "cosine"])
def test_optimisation_attacks_keep_the_start_with_the_lowest_final_objective(attack, chelsea):
    """L-BFGS at lr 1 without a line search (as DLG has it) is chaotic: a start may jump
    uphill on one CPU and not on another, and on some CPUs all four of cnn2_c4's do (458
    against starts of 41 and more). What holds on every CPU is the choice among starts."""
    settings = dataclasses.replace(QUICK, dlg_iters=5, cosine_iters=50, restarts=4)
    result, metrics = run("cnn2_c4", attack, chelsea, settings)
    assert result.x.shape == (1, 3, 32, 32) and torch.isfinite(result.x).all()
    ends = [s["objective_end"] for s in result.info["starts"]]
    assert len(ends) == 4 and result.info["objective_end"] == min(e for e in ends if e is not None)
    assert ends[result.info["best_start"]] == result.info["objective_end"]
    assert np.isfinite(metrics["psnr"]) and np.isfinite(metrics["ssim"])
    if attack in ("idlg", "cosine"):
        assert result.label == chelsea.label


def test_cosine_lowers_its_objective(chelsea):
    """Adam at lr 1e-3 (Cosine+TV) takes small steps, unlike L-BFGS at lr 1: over 50 its objective falls."""
    result, _ = run("cnn2_c4", "cosine", chelsea, dataclasses.replace(QUICK, cosine_iters=50))
    assert result.info["objective_end"] < result.info["objective_start"]


TINY = dataclasses.replace(QUICK, dlg_iters=1, cosine_iters=10, hybrid_iters=4, hybrid_iters_first=10)


def answers(model, sample, attacks, settings=TINY, seed=PUBLISHED_SEED):
    """attack -> its Answer, through the experiment as the script runs it (no seeding here)."""
    events = (e for _, e in share_and_attack([(model, sample)], attacks, settings, seed, "cpu"))
    return {e.attack: e for e in events if isinstance(e, Answer)}


def own_objective(attack, model, grads, result):
    """The attack's own objective at its answer, computed here from the answer alone."""
    x = result.x.clone().requires_grad_()
    if attack == "cosine":
        target = torch.tensor([result.label])
        return (cosine_distance(dummy_gradient(model, model(x), target), grads)
                + 0.01 * len(grads) * total_variation(x)).item()
    return squared_distance(dummy_gradient(model, model(x), torch.tensor([result.label])), grads).item()


@pytest.mark.parametrize("attack", ["idlg", "cosine", "dlg"])
def test_restarts_keep_the_start_with_the_lowest_own_objective(attack, chelsea):
    """--restarts R: R different starts, the first of them the single run's, the one kept
    the lowest final objective (recomputed here from the kept image), every start recorded."""
    model = build_model("cnn2_c4")
    grads = client_gradient(model, chelsea.x, chelsea.label)
    seed_everything(10)
    single = ATTACKS[attack].run(model, grads, chelsea.label, TINY)
    seed_everything(10)
    best = ATTACKS[attack].run(model, grads, chelsea.label, dataclasses.replace(TINY, restarts=4))
    starts = best.info["starts"]
    assert len(starts) == 4 and len({s["objective_start"] for s in starts}) == 4  # four different starts
    assert starts[0]["objective_end"] == single.info["objective_end"]  # the first is the paper's run
    ends = [s["objective_end"] for s in starts]
    assert best.info["best_start"] == ends.index(min(ends)) and best.info["objective_end"] == min(ends)
    if attack == "dlg":  # its objective has the soft label, which the result does not carry
        assert best.label == starts[best.info["best_start"]]["label"]
    else:
        assert own_objective(attack, model, grads, best) == pytest.approx(min(ends), rel=1e-4)
    assert "starts" not in single.info  # one start: the results look as they always did


def test_true_label_is_handed_to_every_attack(chelsea, monkeypatch):
    """With --true-label every attack gets the client's label, else the recovered one;
    recover_label is made to be wrong here so that the two differ."""
    model = build_model("cnn2_c4")
    wrong = (chelsea.label + 1) % 10
    monkeypatch.setattr("leakage.experiment.recover_label", lambda grads, bias_at=-1: wrong)
    given = answers(model, chelsea, list(ATTACKS), dataclasses.replace(TINY, true_label=True))
    assert {a: e.entry["label"] for a, e in given.items()} == dict.fromkeys(ATTACKS, chelsea.label)
    recovered = answers(model, chelsea, ["rgap", "idlg", "cosine", "hybrid"])
    assert {e.entry["label"] for e in recovered.values()} == {wrong}


def test_attacks_see_the_image_only_through_the_gradient(chelsea, photographs, monkeypatch):
    """The threat model: attacks take (model, gradient, label, settings), and the
    experiment hands them nothing else of the client's. Two different private images
    behind one and the same shared gradient must give the same reconstructions."""
    for name, attack in ATTACKS.items():
        assert list(inspect.signature(attack.run).parameters) == ["model", "grads", "label", "settings"], name
    model = build_model("cnn2_c4")
    shared = client_gradient(model, chelsea.x, chelsea.label)
    monkeypatch.setattr("leakage.gradients.client_gradient", lambda model, x, label: shared)
    other = PrivateImage(chelsea.name, photographs[0].x, chelsea.label)  # another image, the same label
    first, second = answers(model, chelsea, list(ATTACKS)), answers(model, other, list(ATTACKS))
    for attack in ATTACKS:
        assert np.array_equal(first[attack].recon, second[attack].recon), attack
    assert first["rgap"].entry["psnr"] != second["rgap"].entry["psnr"]  # the scores do see the image


def test_every_attack_is_reseeded(chelsea):
    """Any subset of the attacks, in any order, gives the same numbers: the experiment
    reseeds before each attack (the test seeds nothing, and disturbs the generators)."""
    model = build_model("cnn2_c4")
    runs = []
    for order in (["dlg", "cosine", "hybrid"], ["cosine", "hybrid", "dlg"], ["hybrid"], ["cosine"]):
        torch.randn(7), np.random.rand(3)  # whatever came before must not matter
        runs.append(answers(model, chelsea, order))
    for attack in ("dlg", "cosine", "hybrid"):
        recons = [run[attack].recon for run in runs if attack in run]
        assert len(recons) >= 2 and all(np.array_equal(recons[0], r) for r in recons[1:]), attack
    assert not np.array_equal(runs[0]["dlg"].recon, runs[0]["cosine"].recon)


def test_the_seed_is_the_runs(chelsea):
    """--seed changes the attacks that start from noise: the reseeding uses it."""
    model = build_model("cnn2_c4")
    a, b = answers(model, chelsea, ["cosine"], seed=10), answers(model, chelsea, ["cosine"], seed=11)
    assert not np.array_equal(a["cosine"].recon, b["cosine"].recon)


SAMPLE_OUTPUT = json.loads((Path(__file__).resolve().parents[1] / "assets" / "sample_output.json").read_text())


def committed(model, image, attack):
    (run_,) = [r for r in SAMPLE_OUTPUT["runs"] if (r["model"], r["image"]) == (model, image)]
    return run_["attacks"][attack]


@pytest.mark.parametrize("model,position", [pytest.param("cnn2_c2", 3, marks=pytest.mark.slow), ("cnn2_c2", 0),
                                            pytest.param("cnn4_c1", 3, marks=pytest.mark.slow),
                                            pytest.param("cnn4_c2", 3, marks=pytest.mark.slow)])
def test_rgap_remakes_the_committed_sample_output(model, position, photographs):
    """assets/sample_output.json was made at paper settings by studies/make_sample_output.sh;
    R-GAP has no iterations, so its numbers must come back exactly (to float rounding)."""
    sample = photographs[position]
    result, metrics = run(model, "rgap", sample)
    expected = committed(model, sample.name, "rgap")
    assert metrics["psnr"] == pytest.approx(expected["psnr"], abs=0.01)
    assert metrics["ssim"] == pytest.approx(expected["ssim"], abs=1e-4)
    assert result.info["security_index"] == [r for r in SAMPLE_OUTPUT["runs"]
                                             if (r["model"], r["image"]) == (model, sample.name)][0]["security_index"]


@pytest.mark.slow
def test_hybrid_remakes_the_committed_sample_output(chelsea):
    """The hybrid on cnn2_c2 at paper settings (10000 Adam steps on the image): a smooth,
    non-chaotic optimisation, so its PSNR comes back to 0.05 dB."""
    settings = AttackSettings()
    _, metrics = run("cnn2_c2", "hybrid", chelsea, settings)
    expected = committed("cnn2_c2", chelsea.name, "hybrid")
    assert metrics["psnr"] == pytest.approx(expected["psnr"], abs=0.05)
    assert metrics["ssim"] == pytest.approx(expected["ssim"], abs=1e-3)


@pytest.mark.slow
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


# -- hybrid_free: ours, beside the paper's hybrid ----------------------------------------

def corrected_layers(monkeypatch, model_name, image, correct_where):
    """The layers whose gradient matching (Adam loop) ran in hybrid_free, in order, and its result."""
    ran, match = [], gradient_matching

    def spy(models, systems, x_hats, **kw):
        ran.extend(system.layer for system in systems)
        return match(models, systems, x_hats, **kw)
    monkeypatch.setattr("leakage.paper.gradient_matching", spy)
    result, _ = run(model_name, "hybrid_free", image, dataclasses.replace(QUICK, correct_where=correct_where))
    return ran, result


def test_hybrid_free_is_rgap_exactly_on_a_full_rank_model(chelsea, monkeypatch):
    ran, result = corrected_layers(monkeypatch, "cnn2_c1", chelsea, "free-at-or-above")
    rgap, _ = run("cnn2_c1", "rgap", chelsea, QUICK)
    assert ran == [] and result.info["corrected_layers"] == [] and result.info["rank_deficiency"] == [0]
    assert torch.equal(result.x, rgap.x)


@pytest.mark.parametrize("correct_where, expected", [("free-at-or-above", [1, 0]), ("free-here", [1])])
def test_hybrid_free_corrects_exactly_the_layers_its_rule_names(chelsea, monkeypatch, correct_where, expected):
    ran, result = corrected_layers(monkeypatch, "cnn3_c1", chelsea, correct_where)  # deficiencies [0, -4533]
    assert result.info["rank_deficiency"][1] < 0 == result.info["rank_deficiency"][0]
    assert ran == result.info["corrected_layers"][::-1] == expected


def test_hybrid_free_keeps_a_determined_top_layer_and_corrects_the_free_one_below(chelsea, monkeypatch):
    ran, result = corrected_layers(monkeypatch, "cnn3_c4", chelsea, "free-at-or-above")  # [-2146, 0]
    assert result.info["rank_deficiency"][0] < 0 == result.info["rank_deficiency"][1] and ran == [0]
