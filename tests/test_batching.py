"""Images of one model gradient-matched together (--batch-images): each image's objective and
gradient are its own, each image's answer is its run alone's to float32 rounding, the cells
group into units by model and defence, and a unit's error costs only the cells it left
unfinished."""
import dataclasses
import json

import pytest
import torch

import torch.nn.functional as F
import hybrid as H
from leakage.activations import activation_derivative
from leakage.data import PrivateImage
from leakage.defences import NO_DEFENCE, defend, parse_defence, surviving
from leakage.experiment import Cell, answers, units_of, score_answer
from leakage.models import gradients_from
from leakage.modules import build_model
from leakage.paper import (
    Batch, batched_objective, client_gradient, gradient_matching, hybrid_objective, known_entries,
    layer_system
)
from leakage.settings import AttackSettings
from conftest import run_script, the_folder

TINY = dataclasses.replace(AttackSettings(), hybrid_iters=8, hybrid_iters_first=40)
LINEAR = ["rgap", "hybrid", "hybrid_free"]


def clients(model, images, defence=NO_DEFENCE):
    out = []
    for image in images:
        shared, _ = defend(client_gradient(model, image.x, image.label), defence, 10)
        out.append((model, shared, image.label))
    return out


def systems_at(model, images, layer, defence=NO_DEFENCE):
    """Each image's layer system at `layer` from the true activations, and a start near them."""
    out = []
    for (_, shared, label), image in zip(clients(model, images, defence), images):
        a = image.x
        for i in range(layer):
            a = model.acts[i](model.layers[i](a))
        conv = model.layers[layer]
        z = conv(a).detach()
        out_grad = torch.autograd.grad(
            F.cross_entropy(model(model.acts[layer](z.requires_grad_()), layer + 1), torch.tensor([label])), z)[0]
        known = None if not defence.removes_equations else surviving(shared)
        system = layer_system(model, layer, model.acts[layer](z).double(),
                                (out_grad / activation_derivative(model.acts[layer], z)).double(), shared, known)
        start = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(layer))).detach()
        out.append((system.to(torch.float32, "cpu"), start, shared, label))
    return out


@pytest.mark.parametrize("name, layer, defence", [("cnn4_c2", 0, "none"), ("cnn4_c2", 1, "none"),
                                                   ("lenet", 1, "none"), ("cnn3_c1", 0, "prune:0.5")])
def test_batched_objective_is_each_images_own(photographs, name, layer, defence):
    """J and dJ/dx of each image in the batch equal hybrid_objective's on that image
    alone, to float32 rounding: its own weights' dummy gradient, residual and TV. lenet's
    layers have biases; under pruning the cosine and the residual read the surviving entries."""
    model, d = build_model(name), parse_defence(defence)
    settings = dataclasses.replace(TINY, zeros_are_missing=d.removes_equations)
    parts = systems_at(model, photographs[:3], layer, d)
    weights = (1.0, 1.0, 0.05)
    shared = [gradients_from(model, g, layer) for _, _, g, _ in parts]
    known = [known_entries(s, settings) for s in shared]
    batch = Batch.of([model] * 3, [s for s, *_ in parts], shared, None if known[0] is None else known,
                       torch.tensor([label for *_, label in parts]))
    x = torch.cat([start for _, start, _, _ in parts]).requires_grad_()
    J = batched_objective(model, batch, x, weights)
    dx = torch.autograd.grad(J.sum(), [x])[0]
    for i, (system, start, _, label) in enumerate(parts):
        x1 = start.clone().requires_grad_()
        J1 = hybrid_objective(model, system, x1, shared[i], torch.tensor([label]), weights, known[i])
        dx1 = torch.autograd.grad(J1, [x1])[0]
        assert torch.allclose(J[i], J1, rtol=1e-5), (i, J[i].item(), J1.item())
        assert torch.allclose(dx[i:i + 1], dx1, rtol=1e-4, atol=1e-5 * dx1.abs().max().item()), i


def test_each_image_of_a_batch_answers_as_it_does_alone(photographs):
    """Three photographs attacked together and one at a time: the same ranks, corrected
    layers and derivations, and reconstructions equal to the bit: an image's numbers do not
    depend on the batch it was in (nor on a resume or a shard, which form other batches).
    cnn3_c4's hybrid corrects both its layers; hybrid_free leaves the top one to R-GAP, then
    corrects: it batches corrections that start from R-GAP's solutions."""
    torch.set_num_threads(1)  # as runs are (--threads 1): several threads split reductions by the batch's size
    model = build_model("cnn3_c4")
    together = {(i, a): r for i, a, r, _ in answers(clients(model, photographs[:3]), LINEAR, TINY, 10)}
    for i, client in enumerate(clients(model, photographs[:3])):
        for _, attack, alone, _ in answers([client], LINEAR, TINY, 10):
            batched = together[i, attack]
            assert batched.info.pop("batch_size", 3) == 3
            assert batched.info == alone.info, (i, attack)
            assert torch.equal(batched.x, alone.x), (i, attack)


def test_a_batch_makes_each_correction_once(photographs, monkeypatch):
    """cnn2_c2: the hybrid's one correction per image runs as one batch of three; hybrid_free,
    which corrects the same layer from the same solutions, takes all three from it."""
    batches = []
    together = gradient_matching

    def counted(models, *args, **kwargs):
        batches.append(len(models))
        return together(models, *args, **kwargs)
    monkeypatch.setattr("leakage.paper.gradient_matching", counted)
    results = list(answers(clients(build_model("cnn2_c2"), photographs[:3]), LINEAR, TINY, 10))
    assert batches == [3]
    assert [r.info.get("derived_from") for _, a, r, _ in results if a == "hybrid_free"] == ["hybrid"] * 3


def test_cells_group_by_model_defence_and_attacks():
    """Up to B cells of one model, defence and attacks left; the first unit of each group,
    then the second, each time the costlier model's first; singletons, in their order,
    without a hybrid to batch, with --compile, or with B = 1."""
    images = [PrivateImage(f"img:{i}", torch.zeros(1, 3, 32, 32), 0) for i in range(5)]
    prune = parse_defence("prune:0.5")
    cells = [Cell(m, image, LINEAR, False, d) for image in images for m in ("cnn2_c2", "cnn4_c2")
             for d in (NO_DEFENCE, prune)]
    cells[0] = cells[0]._replace(attacks=["hybrid"])  # a resumed cell with less left is grouped apart
    units = units_of(dataclasses.replace(TINY, batch_images=4), cells)
    named = [(u[0].model, u[0].defence.spec, [c.image.name[4:] for c in u]) for u in units]
    assert named == [("cnn4_c2", "none", ["0", "1", "2", "3"]), ("cnn4_c2", "prune:0.5", ["0", "1", "2", "3"]),
                     ("cnn2_c2", "none", ["0"]), ("cnn2_c2", "prune:0.5", ["0", "1", "2", "3"]),
                     ("cnn2_c2", "none", ["1", "2", "3", "4"]),
                     ("cnn4_c2", "none", ["4"]), ("cnn4_c2", "prune:0.5", ["4"]), ("cnn2_c2", "prune:0.5", ["4"])]
    assert all(len({(c.model, c.defence.spec, tuple(c.attacks)) for c in u}) == 1 for u in units)
    for settings in (dataclasses.replace(TINY, batch_images=1), dataclasses.replace(TINY, compile=True)):
        assert units_of(settings, cells) == [(c,) for c in cells]
    rgap_only = [c._replace(attacks=["rgap", "dlg"]) for c in cells]
    assert units_of(TINY, rgap_only) == [(c,) for c in rgap_only]


@pytest.mark.slow
def test_a_units_error_costs_only_its_unfinished_cells(tmp_path, monkeypatch, capsys):
    """Two images of cnn2_c2 in one unit: scoring the second image's hybrid fails, after
    the first image's cell is recorded whole. Only the second is reported lost, and
    --resume finishes it."""
    score = score_answer

    def failing(name, result, seconds, image):
        if name == "hybrid" and image.name == "samples:chelsea":
            raise RuntimeError("a bug in the second image's scoring")
        return score(name, result, seconds, image)
    monkeypatch.setattr("leakage.experiment.score_answer", failing)
    args = ["--quick", "--source", "samples", "--model", "cnn2_c2", "--index", "0,3", "--attacks", "rgap", "hybrid",
            "--output", str(tmp_path)]
    assert H.main(args) == 1
    err = capsys.readouterr().err
    assert "cnn2_c2 on samples:chelsea: RuntimeError" in err and "samples:astronaut" not in err, err
    folder = the_folder(tmp_path)
    runs = {e["image"]: e for e in json.loads((folder / "results.json").read_text())["runs"]}
    assert set(runs["samples:astronaut"]["attacks"]) == {"rgap", "hybrid"}
    assert set(runs["samples:chelsea"]["attacks"]) == {"rgap"}
    assert runs["samples:astronaut"]["attacks"]["hybrid"]["batch_size"] == 2
    monkeypatch.undo()
    out = run_script(*args, "--resume", str(folder))
    assert out.returncode == 0, out.stderr
    runs = {e["image"]: e for e in json.loads((folder / "results.json").read_text())["runs"]}
    assert set(runs["samples:chelsea"]["attacks"]) == {"rgap", "hybrid"}
