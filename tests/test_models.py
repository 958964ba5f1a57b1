"""The model zoo, the client's gradient and label recovery."""
import math

import pytest
import torch
import torch.nn as nn

import hybrid as H


@pytest.mark.parametrize("name", list(H.MODELS))
def test_every_model_builds_and_runs(name, chelsea):
    model = H.build_model(name)
    arch = H.MODELS[name]
    assert len(model.layers) == len(arch.convs) + 1 == len(model.acts)
    assert model.layers[-1].in_features == math.prod(model.shapes[-1])
    assert all((layer.bias is not None) == arch.bias for layer in model.layers[:-1])
    out = model(chelsea.x)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    # the seed rule: building again gives the same weights; another seed, others
    again, other = H.build_model(name), H.build_model(name, seed=11)
    for p, q, r in zip(model.parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q) and not torch.equal(p, r)


def test_weights_follow_the_published_initialisation():
    """Seed 10, then the layers in order with PyTorch's default initialisation."""
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 6, 3, 1, 0, bias=False)
    fc = nn.Linear(6 * 30 * 30, 10)
    model = H.build_model("cnn2_c1")
    assert torch.equal(model.layers[0].weight, conv.weight)
    assert torch.equal(model.layers[1].weight, fc.weight) and torch.equal(model.layers[1].bias, fc.bias)


def test_activation_slopes_come_from_the_table():
    assert all(a.negative_slope == 0.2 for a in H.build_model("cnn6d").acts[:-1])
    assert all(a.negative_slope == 0.01 for a in H.build_model("lenet").acts[:-1])
    assert H.build_model("cnn3_c5").layers[-1].in_features == 12 * 15 * 15  # derived, not hard-coded


def test_client_gradient_is_the_cross_entropy_gradient(chelsea):
    model = H.build_model("cnn3_c1")
    grads = H.client_gradient(model, chelsea.x, chelsea.label)
    assert [g.shape for g in grads] == [p.shape for p in model.parameters()]
    # a finite-difference check of one weight
    p = model.layers[-1].bias
    ce = lambda: torch.nn.functional.cross_entropy(model(chelsea.x), torch.tensor([chelsea.label]))
    with torch.no_grad():
        base = ce()
        p[0] += 1e-3
        bumped = ce()
        p[0] -= 1e-3
    assert abs((bumped - base).item() / 1e-3 - grads[-1][0].item()) < 1e-3


@pytest.mark.parametrize("name", ["cnn2_c1", "cnn2_c11", "cnn3_c12", "cnn4_c2", "lenet"])
def test_label_recovery_is_right(name, photographs):
    model = H.build_model(name)
    for sample in photographs:
        for label in {sample.label, (sample.label + 5) % 10}:  # its own label and another
            assert H.recover_label(H.client_gradient(model, sample.x, label)) == label
