"""The extension points: a new attack is one function and one row of ATTACKS, a new defence
one function and one row of DEFENCES, a new activation one row of ACTIVATIONS; everything else
(the parser, the record, the summaries, the figures, --analyse) follows from the rows."""
import csv
import json

import pytest
import torch

import hybrid as H
from leakage import report
from leakage.activations import ACTIVATIONS, Activation
from leakage.attacks import ATTACKS, Attack
from leakage.data import to_image
from leakage.metrics import score
from leakage.models import architecture, random_architectures
from leakage.modules import build_model, architecture_text, read_module
from leakage.paper import client_gradient
from leakage.settings import AttackSettings
from leakage.cli import build_parser
from leakage.defences import DEFENCES, DefenceKind, Param, parse_defence
from leakage.matching import AttackResult
from leakage.record import report_names, rows_in


def toy_attack(model, grads, label, settings):
    """A grey image: an attack that reads nothing but the label."""
    return AttackResult(torch.zeros(1, 3, 32, 32, device=grads[0].device), label)


def scale(grads, params, seed):
    return [g * params["factor"] for g in grads]


TOY_ATTACK = Attack(toy_attack, "Toy", "*", paper=False)
TOY_DEFENCE = DefenceKind((Param("factor", "F", lambda v: v > 0, "a finite number above 0"),), scale,
                            lambda p: p["factor"], "the toy's factor F", "F", "scales the whole gradient by F")


@pytest.fixture(scope="module")
def toy_rows():
    """The toy attack and the toy defence registered, one row each, for these tests alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ATTACKS, "toy", TOY_ATTACK)
        patch.setitem(DEFENCES, "toy", TOY_DEFENCE)
        parse_defence.cache_clear()
        yield
    parse_defence.cache_clear()


MODELS = ["cnn2_c1", "cnn2_c4", "cnn2_c2"]  # three models: the study figure is drawn


@pytest.fixture(scope="module")
def toy_sweep(toy_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    assert H.main(["--model", *MODELS, "--source", "samples", "--index", "3", "--attacks", "rgap", "toy",
                   "--defence", "none", "toy:0.5", "toy:2", "--output", str(out)]) == 0
    (folder,) = list(out.iterdir())
    return folder


def test_a_new_attack_and_a_new_defence_run_a_sweep_with_one_row_each(toy_sweep):
    with (toy_sweep / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["attack"], r["defence"]) for r in rows} == {(a, d) for a in ("rgap", "toy")
                                                           for d in ("none", "toy:0.5", "toy:2")}
    assert len(rows) == 2 * 3 * len(MODELS)
    results = json.loads((toy_sweep / "results.json").read_text())
    toy = next(e for e in results["runs"] if e["defence"]["spec"] == "toy:0.5")
    assert toy["defence"]["kind"] == "toy" and toy["defence"]["factor"] == 0.5
    assert toy["defence"]["norm_after"] == pytest.approx(0.5 * toy["defence"]["norm_before"])
    assert "| Toy |" in (toy_sweep / "summary.md").read_text()
    for figure in ("comparison.png", "index_vs_quality.png", "defence_vs_quality.png"):
        assert (toy_sweep / figure).stat().st_size > 1000, figure


def test_the_figures_draw_the_new_rows_marker_and_strength(toy_sweep, tmp_path):
    rows = rows_in(json.loads((toy_sweep / "results.json").read_text()))
    study = report.plot_index_vs_quality(report.undefended(rows), tmp_path / "i.png", report_names())
    shown = {t.get_text(): h for legend in study.legends for h, t in zip(legend.legend_handles, legend.get_texts())}
    assert shown["Toy"].get_marker() == "*"
    defended = report.plot_defence_vs_quality(rows, tmp_path / "d.png", report_names())
    assert any(ax.get_xlabel() == "the toy's factor F" for ax in defended.axes)
    (panel, _) = [ax for ax in defended.axes if ax.get_title() == "toy"] + [None]
    xs = {float(x) for line in panel.lines for x in line.get_xdata()}
    assert xs == {0.0, 0.5, 2.0}  # none at 0, then each factor at its strength


def test_analyse_and_the_help_take_the_new_rows(toy_rows, capsys):
    assert H.main(["--analyse", "--model", "cnn2_c2", "--source", "samples", "--index", "3",
                   "--defence", "none", "toy:0.5"]) == 0
    out = capsys.readouterr().out
    assert "toy:F leave every equation in place" in out and "cnn2_c2 on samples:chelsea: security index -1470" in out
    help_text = build_parser().format_help()
    assert "toy" in help_text and "toy:F (scales the whole gradient by F)" in " ".join(help_text.split())
    assert H.main(["--defence", "toy:0", "--model", "cnn2_c2", "--source", "samples"]) == 2
    assert "factor must be a finite number above 0" in capsys.readouterr().err


def test_a_row_without_its_figure_or_strength_entry_is_refused_at_once():
    """The fields the figures need have no defaults: a row that leaves one out fails where it
    is written, not when a sweep of three models finishes."""
    with pytest.raises(TypeError):
        Attack(toy_attack, "Toy", paper=False)  # no marker
    with pytest.raises(TypeError):
        DefenceKind(TOY_DEFENCE.params, scale, "the toy's factor F", "F", "scales")  # no strength


# -- a new activation: one row of ACTIVATIONS -------------------------------------------------


class Asinh(torch.nn.Module):
    """An invertible activation the tool does not know: asinh, whose inverse is sinh."""

    def forward(self, x):
        return torch.asinh(x)


TOY_ACTIVATION = Activation("asinh", Asinh, lambda p: Asinh(), lambda act, a: torch.sinh(a),
                            lambda act, z: 1 / torch.sqrt(1 + z ** 2), calls=("asinh",), from_call=lambda a, k: Asinh())


class FunctionalAsinh(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 6, 3, bias=False), torch.nn.Linear(6 * 30 * 30, 10)

    def forward(self, x):
        return self.fc(torch.asinh(self.conv(x)).flatten(1))


def rgap_psnr(model, image):
    grads = client_gradient(model, image.x, image.label)
    result = ATTACKS["rgap"].run(model, grads, image.label, AttackSettings())
    return score(to_image(image.x), to_image(result.x))["psnr"]


def test_a_new_activation_is_one_row_from_a_string_and_from_a_module(chelsea, monkeypatch):
    drawn = random_architectures(40, 0)
    monkeypatch.setitem(ACTIVATIONS, "asinh", TOY_ACTIVATION)
    architecture.cache_clear()
    try:
        string = build_model("6k3s1p0-asinh,fc-id")  # cnn2_c1's architecture, full rank
        assert isinstance(string.acts[0], Asinh) and architecture_text(string) == "6k3s1p0-asinh,fc-id"
        assert rgap_psnr(string, chelsea) > 60  # exact: the row's inverse and derivative are used
        module = read_module(FunctionalAsinh(), (3, 32, 32))
        assert isinstance(module.acts[0], Asinh)
        module.load_state_dict(string.state_dict())
        assert rgap_psnr(module, chelsea) > 60
        assert random_architectures(40, 0) == drawn  # random:N draws from a frozen tuple: committed draws stand
    finally:
        architecture.cache_clear()
