"""The study: does the security index predict leakage? Model groups, the index beside the
quality, its rank correlations, the study figure, and trained weights."""
import dataclasses
import itertools
import json
import random

import numpy as np
import pytest
import torch
from scipy import stats

import hybrid as H
from leakage import report, sweeps
from leakage.console import UserError
from leakage.data import PHOTOGRAPHS
from leakage.experiment import prepare_model
from leakage.models import MODELS
from leakage.modules import build_model, expand_models, layer_unknowns
from leakage.paper import indices_of, security_index, worst_layer_fraction
from leakage.record import RECORD, finish, first_activation, report_names, rows_in, upgraded
from leakage.settings import Experiment
from leakage.training import photograph_crops
from conftest import run_script


def test_all_and_patterns_expand_in_the_zoos_order():
    assert expand_models(["all"]) == list(MODELS) and len(MODELS) == 35
    family = expand_models(["cnn3_*"])
    assert family[:2] == ["cnn3_c1", "cnn3_c2"] and all(m.startswith("cnn3_") for m in family)
    assert len(family) == sum(m.startswith("cnn3_") for m in MODELS)
    assert expand_models(["cnn4_c2", "cnn4_c[12]", "lenet"]) == ["cnn4_c2", "cnn4_c1", "lenet"]
    with pytest.raises(UserError, match="matches no model"):
        expand_models(["cnn9_*"])
    with pytest.raises(UserError, match="unknown model 'cnn9'"):
        expand_models(["cnn9"])


def test_a_pattern_that_matches_nothing_is_one_line(capsys):
    assert H.main(["--model", "vgg*", "--source", "samples"]) == 2
    err = capsys.readouterr().err
    assert "--model 'vgg*' matches no model" in err and len(err.strip().splitlines()) == 1


def table(spec):
    """The record's rows (hybrid.row's) from {model: {image: (index, {attack: psnr})}}."""
    return [{"model": m, "image": i, "defence": "none", "attack": a, "label": 3, "label_correct": True, "psnr": p,
             "ssim": 0.5, "seconds": 1.0, "security_index": index, "worst_layer_fraction": None, "kind": "none",
             "strength": 0.0, "first_activation": first_activation(m), "fc_inputs_undetermined": 0.0}
            for m, images in spec.items() for i, (index, psnrs) in images.items() for a, p in psnrs.items()]


STUDY = {
    "a": {"x": (0, {"rgap": 90.0, "hybrid": 30.0}), "y": (0, {"rgap": 80.0, "hybrid": 28.0})},
    "b": {"x": (-10, {"rgap": 20.0, "hybrid": 25.0}), "y": (-30, {"rgap": 18.0, "hybrid": 21.0})},
    "c": {"x": (-500, {"rgap": 15.0, "hybrid": 22.0}), "y": (-700, {"rgap": 13.0, "hybrid": 17.0})},
    "d": {"x": (-6000, {"rgap": 12.0, "hybrid": 24.0}), "y": (-6400, {"rgap": 11.0, "hybrid": 19.0})},
}


def test_the_index_is_aggregated_per_model_over_its_images():
    summary = report.summarise(table(STUDY), report_names())
    b_rgap = next(e for e in summary if (e["model"], e["attack"]) == ("b", "rgap"))
    assert (b_rgap["index_mean"], b_rgap["index_min"], b_rgap["index_max"]) == (-20, -30, -10)
    assert b_rgap["psnr_mean"] == 19.0 and b_rgap["n"] == 2
    assert {e["index_mean"] for e in summary if e["model"] == "d"} == {-6200}


def test_correlations_are_scipys_on_each_models_own_numbers():
    corr = report.index_correlations(table(STUDY), report_names())
    index = [0, -20, -600, -6200]
    hybrid = [29.0, 23.0, 19.5, 21.5]
    rho, _ = stats.spearmanr(index, hybrid)
    tau, q = stats.kendalltau(index, hybrid)
    exact = np.mean([abs(stats.spearmanr(index, order)[0]) >= abs(rho) - 1e-12  # every pairing of 4 points
                     for order in itertools.permutations(hybrid)])
    scalars = {k: corr["security_index"]["hybrid"]["models"][k] for k in ("n", "spearman_rho", "spearman_p",
                                                                          "kendall_tau", "kendall_p")}
    assert scalars == pytest.approx({"n": 4, "spearman_rho": rho, "spearman_p": exact, "kendall_tau": tau,
                                     "kendall_p": q})
    points = [(i, p) for m in STUDY.values() for i, ps in m.values() for a, p in ps.items() if a == "rgap"]
    assert corr["security_index"]["rgap"]["pairs"]["spearman_rho"] == pytest.approx(stats.spearmanr(*zip(*points))[0])
    rgap = corr["security_index"]["rgap"]
    assert rgap["pairs"]["n"] == 8 and rgap["models"]["spearman_rho"] == pytest.approx(1.0)


def test_the_join_pairs_each_models_index_with_its_own_psnr():
    rows = table(STUDY)
    before = report.index_correlations(rows, report_names())
    random.Random(0).shuffle(rows)
    shuffled = report.index_correlations(rows, report_names())  # the order of rows does not matter
    for attack in before["security_index"]:
        for over in ("models", "pairs"):
            assert shuffled["security_index"][attack][over] == before["security_index"][attack][over]
    swapped = json.loads(json.dumps(STUDY))
    swapped["a"], swapped["d"] = ({i: (STUDY["d"][i][0], v[1]) for i, v in STUDY["a"].items()},
                                  {i: (STUDY["a"][i][0], v[1]) for i, v in STUDY["d"].items()})
    after = report.index_correlations(table(swapped), report_names())
    assert after["security_index"]["rgap"]["models"]["spearman_rho"] != pytest.approx(
        before["security_index"]["rgap"]["models"]["spearman_rho"])


def runs_of(spec):
    """results.json's runs from {model: {image: (index, {attack: psnr})}}."""
    entry = lambda psnr: {"psnr": psnr, "ssim": 0.5, "seconds": 1.0, "label": 3, "label_correct": True}  # noqa: E731
    return [{"model": m, "image": i, "security_index": index, "attacks": {a: entry(p) for a, p in psnrs.items()}}
            for m, images in spec.items() for i, (index, psnrs) in images.items()]


def test_the_study_figure_is_written_for_three_models_or_more(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plot_comparison", lambda *args: None)  # these runs have no arrays
    for n_models in (2, 3):
        folder = tmp_path / str(n_models)
        folder.mkdir()
        finish(sweeps.RunFolder(folder, upgraded({"runs": runs_of(dict(list(STUDY.items())[:n_models]))}),
                                                      RECORD))
        assert (folder / "index_vs_quality.png").exists() == (n_models >= 3)
        results = json.loads((folder / "results.json").read_text())
        by_attack = results["correlations"]["security_index"]
        assert ("models" in by_attack["hybrid"]) == (n_models >= 3)  # 2 models: no correlation
        assert by_attack["hybrid"]["pairs"]["n"] == 2 * n_models
        assert ("rank correlations" in (folder / "summary.md").read_text()) == (n_models >= 3)


CFG = Experiment(device="cpu")


def points_by_axes(fig):
    """{gid 'model|attack|metric': (axes, x)} of every point the study figure drew."""
    return {line.get_gid(): (ax, line.get_xdata()[0]) for ax in fig.axes for line in ax.lines if line.get_gid()}


def test_index_0_models_sit_in_their_own_strip_and_the_rest_at_their_exact_index(tmp_path):
    spec = {"cnn2_c1": STUDY["a"], "cnn2_c11": STUDY["a"], "cnn3_c1": STUDY["c"], "cnn3_c11": STUDY["c"],
            "cnn4_c2": STUDY["d"]}  # two pairs share an index: no jitter may part them
    fig = report.plot_index_vs_quality(table(spec), tmp_path / "f.png", report_names())
    points = points_by_axes(fig)
    assert len(points) == 2 * 2 * len(spec)  # PSNR and SSIM panels, two attacks
    strip = {ax for ax in fig.axes if "index 0" in ax.get_title()} | {
        ax for ax in fig.axes if [t.get_text() for t in ax.get_xticklabels()] == ["cnn2_c1", "cnn2_c11"]}
    for gid, (ax, x) in points.items():
        model = gid.split("|")[0]
        if model in ("cnn2_c1", "cnn2_c11"):
            assert ax in strip and x == ["cnn2_c1", "cnn2_c11"].index(model)
        else:
            assert ax not in strip and ax.get_xscale() == "symlog" and x == {"cnn3_c1": -600, "cnn3_c11": -600,
                                                                            "cnn4_c2": -6200}[model]
    assert first_activation("cnn3_c11") == "leaky 0.01" and first_activation("cnn6d") == "leaky 0.2"
    colours = {gid: ax.lines[[line.get_gid() for line in ax.lines].index(gid)].get_color()
               for gid, (ax, _) in points.items()}
    assert colours["cnn3_c1|rgap|psnr"] != colours["cnn3_c11|rgap|psnr"] == colours["cnn2_c11|hybrid|ssim"]


def test_no_training_leaves_the_published_initialisation(chelsea):
    model, training = prepare_model(CFG, "cnn3_c1", chelsea)
    assert training is None
    for p, q in zip(model.parameters(), build_model("cnn3_c1").parameters()):
        assert torch.equal(p, q)


def test_training_changes_the_weights_the_same_way_every_time(chelsea):
    cfg = dataclasses.replace(CFG, train_steps=5)
    (first, info), (again, _) = prepare_model(cfg, "cnn3_c1", chelsea), prepare_model(cfg, "cnn3_c1", chelsea)
    published = build_model("cnn3_c1")
    for p, q, r in zip(first.parameters(), again.parameters(), published.parameters()):
        assert torch.equal(p, q) and not torch.equal(p, r)
    assert info["steps"] == 5 and info["lr"] == 0.01 and np.isfinite(info["final_loss"])
    assert "chelsea" not in info["data"] and "astronaut" in info["data"]


def test_the_attacked_photograph_is_not_in_the_training_data(monkeypatch):
    """chelsea is made pure red; crops excluding it hold no pure-red image, crops that
    may include it do (so the check can fail)."""
    red = np.zeros((60, 80, 3), np.uint8)
    red[..., 0] = 255
    samples = [(n, (lambda d: red) if n == "chelsea" else load, lab) for n, load, lab in PHOTOGRAPHS]
    monkeypatch.setattr("leakage.training.PHOTOGRAPHS", samples)
    monkeypatch.setattr("leakage.training.CROP_POOL", 256)  # about 50 of them from each photograph
    photograph_crops.cache_clear()
    try:
        pure_red = lambda x: ((x[:, 0] > 0.49) & (x[:, 1:] < -0.49).all(1)).flatten(1).all(1)  # noqa: E731
        assert not pure_red(photograph_crops("chelsea", 10)[0]).any()
        assert pure_red(photograph_crops("astronaut", 10)[0]).any()
    finally:
        photograph_crops.cache_clear()


@pytest.mark.slow
def test_a_trained_run_records_its_training(tmp_path):
    out = run_script("--quick", "--source", "samples", "--model", "cnn2_c4", "--attacks", "rgap",
                     "--train-steps", "20", "--output", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (folder,) = list(tmp_path.iterdir())
    results = json.loads((folder / "results.json").read_text())
    assert results["config"]["train_steps"] == 20
    (run_,) = results["runs"]
    assert run_["training"]["steps"] == 20 and "chelsea" not in run_["training"]["data"]
    rows = (folder / "results.csv").read_text().splitlines()
    assert rows[0].endswith("security_index,worst_layer_fraction")
    assert rows[1].endswith(f"{run_['security_index']},{run_['worst_layer_fraction']!r}")


def test_the_worst_layers_fraction_on_a_hand_made_table():
    assert worst_layer_fraction([0, 0, 0], [3072, 7200, 1200]) == 0
    assert worst_layer_fraction([0, -900, -100], [3072, 1800, 1000]) == -0.5  # layer 1 leaves half free
    assert worst_layer_fraction([-3072, 0], [3072, 5400]) == -1  # layer 0 determines nothing
    assert layer_unknowns("cnn4_c2") == [3 * 32 * 32, 16 * 28 * 28, 6 * 12 * 12]
    both = indices_of([0, -9316, 0], layer_unknowns("cnn4_c2"))
    assert both == {"security_index": security_index([0, -9316, 0]), "worst_layer_fraction": -9316 / 12544}


def test_rows_carry_both_indices_and_each_gets_its_own_correlations():
    runs = [{"model": m, "image": "x", "rank_deficiency": r, "attacks": {"rgap": {
        "psnr": p, "ssim": 0.5, "seconds": 1.0, "label": 3, "label_correct": True}}}
        for m, r, p in [("cnn2_c1", [0], 90.0), ("cnn2_c2", [-1470], 15.0), ("cnn3_c1", [0, -4533], 13.0),
                        ("cnn4_c2", [0, -9316, 0], 14.0)]]  # written before the fraction: computed from the ranks
    rows = rows_in({"runs": runs})
    assert [r["worst_layer_fraction"] for r in rows] == [0, -1470 / 3072, -4533 / 5400, -9316 / 12544]
    corr = report.index_correlations(rows, report_names())
    assert set(corr) == {"security_index", "worst_layer_fraction"}
    fraction = [r["worst_layer_fraction"] for r in rows]
    assert corr["worst_layer_fraction"]["rgap"]["models"]["spearman_rho"] == pytest.approx(
        stats.spearmanr(fraction, [90.0, 15.0, 13.0, 14.0])[0])
    assert "| worst layer's fraction | R-GAP | models | 4 |" in report.correlation_table(corr, report_names())


def test_small_samples_get_exact_p_values_and_one_model_none():
    """Three models in order: Spearman's p is 2/6 by every pairing (scipy's t approximation
    says 0), as Kendall's exact p is; one model has no correlation to report."""
    three = {m: STUDY[m] for m in ("a", "b", "c")}
    corr = report.index_correlations(table(three), report_names())["security_index"]["rgap"]["models"]
    assert corr["spearman_rho"] == pytest.approx(1.0) and corr["spearman_p"] == pytest.approx(1 / 3)
    assert corr["kendall_p"] == pytest.approx(1 / 3)
    one = report.index_correlations(table({"a": {"x": STUDY["a"]["x"]}}), report_names())
    assert one == {}
