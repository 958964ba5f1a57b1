"""The extension points: a new attack is one function and one row of ATTACKS, a new defence
one function and one row of DEFENCES; everything else (the parser, the record, the
summaries, the figures, --analyse) follows from the rows."""
import csv
import json

import pytest
import torch

import hybrid as H
import report


def toy_attack(model, grads, label, settings):
    """A grey image: an attack that reads nothing but the label."""
    return H.AttackResult(torch.zeros(1, 3, 32, 32, device=grads[0].device), label)


def scale(grads, params, seed):
    return [g * params["factor"] for g in grads]


TOY_ATTACK = H.Attack(toy_attack, "Toy", "*", paper=False)
TOY_DEFENCE = H.DefenceKind((H.Param("factor", "F", lambda v: v > 0, "a finite number above 0"),), scale,
                            lambda p: p["factor"], "the toy's factor F", "F", "scales the whole gradient by F")


@pytest.fixture(scope="module")
def toy_rows():
    """The toy attack and the toy defence registered, one row each, for these tests alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(H.ATTACKS, "toy", TOY_ATTACK)
        patch.setitem(H.DEFENCES, "toy", TOY_DEFENCE)
        H.parse_defence.cache_clear()
        yield
    H.parse_defence.cache_clear()


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
    rows = H.rows_in(json.loads((toy_sweep / "results.json").read_text()))
    study = report.plot_index_vs_quality(report.undefended(rows), tmp_path / "i.png", H.names())
    shown = {t.get_text(): h for legend in study.legends for h, t in zip(legend.legend_handles, legend.get_texts())}
    assert shown["Toy"].get_marker() == "*"
    defended = report.plot_defence_vs_quality(rows, tmp_path / "d.png", H.names())
    assert any(ax.get_xlabel() == "the toy's factor F" for ax in defended.axes)
    (panel, _) = [ax for ax in defended.axes if ax.get_title() == "toy"] + [None]
    xs = {float(x) for line in panel.lines for x in line.get_xdata()}
    assert xs == {0.0, 0.5, 2.0}  # none at 0, then each factor at its strength


def test_analyse_and_the_help_take_the_new_rows(toy_rows, capsys):
    assert H.main(["--analyse", "--model", "cnn2_c2", "--source", "samples", "--index", "3",
                   "--defence", "none", "toy:0.5"]) == 0
    out = capsys.readouterr().out
    assert "toy:F leave every equation in place" in out and "cnn2_c2 on samples:chelsea: security index -1470" in out
    help_text = H.build_parser().format_help()
    assert "toy" in help_text and "toy:F (scales the whole gradient by F)" in " ".join(help_text.split())
    assert H.main(["--defence", "toy:0", "--model", "cnn2_c2", "--source", "samples"]) == 2
    assert "factor must be a finite number above 0" in capsys.readouterr().err


def test_a_row_without_its_figure_or_strength_entry_is_refused_at_once():
    """The fields the figures need have no defaults: a row that leaves one out fails where it
    is written, not when a sweep of three models finishes."""
    with pytest.raises(TypeError):
        H.Attack(toy_attack, "Toy", paper=False)  # no marker
    with pytest.raises(TypeError):
        H.DefenceKind(TOY_DEFENCE.params, scale, "the toy's factor F", "F", "scales")  # no strength
