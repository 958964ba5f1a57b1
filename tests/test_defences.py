"""Defences: what the client does to its gradient, what the attacks see, and the linear
systems under pruning."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch

import hybrid as H
from leakage import tables
from leakage.attacks import ATTACKS
from leakage.data import to_image
from leakage.defences import (
    NO_DEFENCE, defence_seed, defend, fc_inputs_undetermined, global_norm, parse_defence, surviving
)
from leakage.experiment import Answer, rank_analysis, share_and_attack
from leakage.matching import AttackResult
from leakage.metrics import score
from leakage.models import by_layer
from leakage.modules import build_model
from leakage.paper import (
    attack_rgap, client_gradient, invert_fc, layer_system, rank_deficiency, recover_label, recursive_reconstruction,
    security_index
)
from leakage.record import removing_equations, report_names, rows_in
from leakage.runtime import seed_everything
from leakage.settings import AttackSettings
from leakage.solvers import solve_min_norm
from conftest import comparable, fresh_run, rows_of

TINY = AttackSettings(dlg_iters=1, cosine_iters=10, hybrid_iters=4, hybrid_iters_first=10)


@pytest.fixture(scope="module")
def cnn2_c4(chelsea):
    model = build_model("cnn2_c4")
    return model, client_gradient(model, chelsea.x, chelsea.label)


# -- the defences themselves ---------------------------------------------------------------


def test_none_shares_the_gradient_itself(cnn2_c4):
    _, grads = cnn2_c4
    shared, record = defend(grads, NO_DEFENCE, 0)
    assert all(s is g for s, g in zip(shared, grads))
    assert record["spec"] == "none" and record["norm_before"] == record["norm_after"] == global_norm(grads)


def test_none_gives_the_attacks_numbers_without_a_defence(chelsea, cnn2_c4):
    """`none` is today's experiment: each answer equals the attack run on the client's gradient."""
    model, grads = cnn2_c4
    events = [e for _, e in share_and_attack([(model, chelsea)], ["rgap", "hybrid", "idlg"], TINY, 10, "cpu")]
    answers = {e.attack: e for e in events if isinstance(e, Answer)}
    for name, answer in answers.items():
        seed_everything(10)
        direct = ATTACKS[name].run(model, grads, recover_label(grads), TINY)
        assert np.array_equal(answer.recon, to_image(direct.x)), name


def test_noise_is_seeded_and_recorded(cnn2_c4):
    _, grads = cnn2_c4
    noise = parse_defence("noise:1e-2")
    (a, ra), (b, _), (c, rc) = defend(grads, noise, 5), defend(grads, noise, 5), defend(grads, noise, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same seed, the same gradient
    assert not any(torch.equal(x, y) for x, y in zip(a, c))  # another seed, another
    assert ra["seed"] == 5 and rc["seed"] == 6 and ra["sigma"] == 0.01
    assert ra["norm_after"] == pytest.approx(global_norm(a)) and ra["norm_before"] == global_norm(grads)
    added = torch.cat([(x - g).flatten() for x, g in zip(a, grads)])
    assert added.std().item() == pytest.approx(0.01, rel=0.05)  # N(0, SIGMA^2) in every entry
    seed = defence_seed
    assert seed(10, "cifar10-test:0") == seed(10, "cifar10-test:0") != seed(11, "cifar10-test:0")


def test_the_same_command_shares_the_same_noisy_gradient(chelsea, cnn2_c4, monkeypatch):
    """Through the experiment: the defence's noise comes from --seed, and only from it."""
    model, _ = cnn2_c4
    seen = []
    spy = lambda model, grads, label, settings: (  # noqa: E731
        seen.append([g.clone() for g in grads]), AttackResult(torch.zeros(1, 3, 32, 32), label))[1]
    monkeypatch.setitem(ATTACKS, "rgap", dataclasses.replace(ATTACKS["rgap"], run=spy))
    for seed in (10, 10, 11):
        torch.randn(5)  # whatever the global generator did before must not matter
        list(share_and_attack([(model, chelsea)], ["rgap"], TINY, seed, "cpu", parse_defence("noise:1e-3")))
    assert all(torch.equal(x, y) for x, y in zip(seen[0], seen[1]))
    assert not any(torch.equal(x, y) for x, y in zip(seen[0], seen[2]))


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9, 0.99])
def test_pruning_zeroes_exactly_the_fraction_of_smallest_entries(cnn2_c4, fraction):
    _, grads = cnn2_c4
    shared, _ = defend(grads, parse_defence(f"prune:{fraction}"), 0)
    for g, s in zip(grads, shared):
        zeroed = (s == 0) & (g != 0)
        assert int((s == 0).sum()) == math.floor(fraction * g.numel())  # exactly floor(P n) per tensor
        assert torch.equal(s[s != 0], g[s != 0])  # the rest untouched
        if zeroed.any() and (~zeroed).any():
            assert g[zeroed].abs().max() <= g[~zeroed].abs().min()  # the smallest ones


def test_pruning_breaks_ties_by_position():
    shared, _ = defend([torch.tensor([1.0, -1.0, 1.0, 2.0])], parse_defence("prune:0.5"), 0)
    assert shared[0].tolist() == [0.0, 0.0, 1.0, 2.0]


def test_dp_clips_to_c_before_the_noise(cnn2_c4):
    _, grads = cnn2_c4
    norm = global_norm(grads)
    assert norm > 1  # so that C = 1 clips
    clipped, record = defend(grads, parse_defence("dp:1:0"), 3)
    assert record["norm_after"] == pytest.approx(1.0) and global_norm(clipped) == pytest.approx(1.0)
    shared, record = defend(grads, parse_defence("dp:1:0.1"), 3)
    expected, _ = defend(clipped, parse_defence("noise:0.1"), 3)  # the noise, Z C = 0.1, on the clipped one
    assert all(torch.allclose(s, e, atol=1e-7) for s, e in zip(shared, expected))
    assert record["norm_after"] > 1  # clipping after the noise would leave at most C
    unclipped, record = defend(grads, parse_defence(f"dp:{2 * norm}:0"), 3)  # within C: untouched
    assert all(torch.equal(u, g) for u, g in zip(unclipped, grads))


@pytest.mark.parametrize("spec,says", [
    ("blur:1", "unknown kind 'blur'"), ("prune:1", "[0, 1)"), ("prune:1.5", "[0, 1)"), ("prune:-0.1", "fraction"),
    ("noise:-1", "sigma"), ("noise:nan", "sigma"), ("dp:0:1", "clip"), ("dp:-1:1", "clip"),
    ("dp:1:-1", "noise_multiplier"), ("noise:abc", "not a number"), ("noise", "expected noise:SIGMA"),
    ("dp:1", "expected dp:CLIP:NOISE_MULTIPLIER"), ("none:1", "expected none"),
    ("prune:0.5:1", "expected prune:FRACTION"),
])
def test_bad_defence_is_one_line_and_exit_2(spec, says, capsys):
    assert H.main(["--defence", "none", spec, "--model", "cnn2_c4", "--source", "samples"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"--defence '{spec}'" in err and says in err, err


# -- the threat model under a defence ---------------------------------------------------------


@pytest.mark.parametrize("spec", ["noise:1e-2", "dp:1:0.1", "prune:0.5"])
def test_attacks_see_only_the_defended_gradient(chelsea, cnn2_c4, monkeypatch, spec):
    model, grads = cnn2_c4
    defence = parse_defence(spec)
    shared, _ = defend(grads, defence, defence_seed(10, chelsea.name))
    seen = {}
    for name in ATTACKS:
        spy = lambda model, grads, label, settings, name=name: (  # noqa: E731
            seen.__setitem__(name, (grads, settings)), AttackResult(torch.zeros(1, 3, 32, 32), label))[1]
        monkeypatch.setitem(ATTACKS, name, dataclasses.replace(ATTACKS[name], run=spy))
    list(share_and_attack([(model, chelsea)], list(ATTACKS), TINY, 10, "cpu", defence))
    assert set(seen) == set(ATTACKS)
    for name, (given, settings) in seen.items():
        assert all(torch.equal(a, b) for a, b in zip(given, shared)), name
        assert not all(torch.equal(a, b) for a, b in zip(given, grads)), name
        assert settings.zeros_are_missing == defence.removes_equations, name


# -- the linear systems under pruning --------------------------------------------------------------


def test_pruned_system_has_exactly_the_surviving_rows_and_their_rank(cnn2_c4):
    model, grads = cnn2_c4
    shared, _ = defend(grads, parse_defence("prune:0.9"), 0)
    kept = surviving(shared)
    a_hat, dl_da = invert_fc(model.layers[-1], *by_layer(model, grads)[-1])
    full = layer_system(model, 0, a_hat, dl_da, grads)
    pruned = layer_system(model, 0, a_hat, dl_da, shared, kept)
    U_full, V_full = full.matrices(model)
    U, V = pruned.matrices(model)
    n_z, rows = full.z_minus_b.numel(), by_layer(model, kept)[0][0].flatten()
    assert U.shape[0] == n_z + int(rows.sum())  # M's rows, then G's surviving rows alone
    assert torch.equal(U, torch.cat([U_full[:n_z], U_full[n_z:][rows]]))
    assert torch.equal(V[n_z:], by_layer(model, shared)[0][0].flatten().double()[rows]) and (V[n_z:] != 0).all()
    _, rank = solve_min_norm(U, V)
    assert rank == np.linalg.matrix_rank(U.numpy()) < np.linalg.matrix_rank(U_full.numpy())
    x = torch.randn(1, *model.shapes[0], dtype=torch.float64)
    _, residual = pruned.forward_and_residual(model.double(), x)
    model.float()
    assert residual.item() == pytest.approx((U @ x.flatten() - V).square().sum().item(), rel=1e-9)


def test_pruned_fc_inversion_is_least_squares_over_what_survives():
    torch.manual_seed(0)
    fc = torch.nn.Linear(6, 4)
    a, d = torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    g_w, g_b = torch.outer(d, a), d.clone()
    everything = (torch.ones(4, 6, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    for kept in [everything, (torch.rand(4, 6) > 0.5, torch.tensor([True, False, True, False]))]:
        kept[0][0] = True  # row 0, with its d_0, survives whole: every a_j is determined
        w, b = g_w * kept[0], g_b * kept[1]
        a_hat, dl_da = invert_fc(fc, w, b, kept)
        assert torch.allclose(a_hat, a) and torch.allclose(dl_da, fc.weight.double().T @ d)
    assert torch.allclose(invert_fc(fc, g_w, g_b, everything)[0], invert_fc(fc, g_w, g_b)[0])


def test_fc_inputs_undetermined_counts_columns_without_a_surviving_equation():
    model = build_model("cnn2_c1")
    kept = [torch.ones_like(p, dtype=torch.bool) for p in model.parameters()]
    assert fc_inputs_undetermined(model, kept) == 0
    kept_w, kept_b = by_layer(model, kept)[-1]
    n = kept_w.shape[1]
    kept_w[:, :3] = False  # no equation at all on a_0..a_2
    kept_w[1:, 3] = False  # a_3: one equation, gW_03, left...
    assert fc_inputs_undetermined(model, kept) == 3 / n
    kept_b[0] = False  # ...and without d_0 = gb_0 it determines nothing
    assert fc_inputs_undetermined(model, kept) == 4 / n


def test_full_rank_model_under_light_pruning_is_still_reconstructed(chelsea):
    """cnn2_c1 is full rank; prune:0.2 leaves it full rank (computed here, not assumed),
    so R-GAP, solving with the surviving equations only, still reconstructs it well."""
    model = build_model("cnn2_c1")
    grads = client_gradient(model, chelsea.x, chelsea.label)
    shared, _ = defend(grads, parse_defence("prune:0.2"), 0)
    assert rank_deficiency(model, grads, surviving(shared)) == [0]  # the equations still determine it
    result = attack_rgap(model, shared, chelsea.label, AttackSettings(zeros_are_missing=True))
    assert result.info["rank_deficiency"] == [0]
    psnr = score(to_image(chelsea.x), to_image(result.x))["psnr"]
    assert psnr > 50
    read_as_zero = attack_rgap(model, shared, chelsea.label, AttackSettings())  # "0 = G x": wrong equations
    assert score(to_image(chelsea.x), to_image(read_as_zero.x))["psnr"] < psnr - 5


# -- the grid, the record, resume and merge -----------------------------------------------------------

GRID = ["--quick", "--source", "samples", "--model", "cnn2_c4", "cnn2_c2", "--index", "3",
        "--attacks", "rgap", "idlg", "--defence", "none", "prune:0.5", "noise:1e-3"]


@pytest.fixture(scope="module")
def defended_run(tmp_path_factory):
    return fresh_run(tmp_path_factory, "defended", *GRID)


def test_the_grid_runs_every_model_image_and_defence(defended_run):
    rows = rows_of(defended_run)
    assert {(r["model"], r["defence"], r["attack"]) for r in rows} == {
        (m, d, a) for m in ("cnn2_c4", "cnn2_c2") for d in ("none", "prune:0.5", "noise:1e-3")
        for a in ("rgap", "idlg")}
    results = json.loads((defended_run / "results.json").read_text())
    for entry in results["runs"]:
        defence = entry["defence"]
        assert defence["norm_before"] > 0 and defence["spec"] in ("none", "prune:0.5", "noise:1e-3")
        if defence["spec"] == "prune:0.5":
            assert defence["security_index"] == security_index(defence["rank_deficiency"])
            assert defence["security_index"] <= entry["security_index"]  # fewer equations, no more rank
            assert 0 <= defence["fc_inputs_undetermined"] < 1
        if defence["spec"] == "noise:1e-3":
            assert defence["seed"] == defence_seed(10, entry["image"])
    assert set(results["correlations_by_defence"]) <= {"prune:0.5", "noise:1e-3"}
    for name in ("defence_vs_quality.png", "pruned_index_vs_quality.png"):
        assert (defended_run / name).exists()
    summary = (defended_run / "summary.md").read_text()
    assert "| defence |" in summary and "| prune:0.5 |" in summary


def test_rows_under_pruning_carry_the_index_of_the_surviving_equations(defended_run):
    results = json.loads((defended_run / "results.json").read_text())
    pruned = {e["model"]: e["defence"]["security_index"] for e in results["runs"]
              if e["defence"]["spec"] == "prune:0.5"}
    plain = {e["model"]: e["security_index"] for e in results["runs"] if e["defence"]["spec"] == "none"}
    for r in rows_of(defended_run):
        expected = pruned if r["defence"] == "prune:0.5" else plain
        assert float(r["security_index"]) == expected[r["model"]]


def test_the_undefended_ranks_are_computed_once_per_model_and_image(tmp_path, monkeypatch):
    """Every defence of a grid shares the client's gradient, and so its ranks."""
    calls = []
    real = rank_analysis
    monkeypatch.setattr("leakage.experiment.rank_analysis", lambda *a: calls.append(a[1].name) or real(*a))
    monkeypatch.setattr("leakage.experiment._UNDEFENDED_RANKS", {})
    assert H.main(["--quick", "--source", "samples", "--model", "cnn2_c2", "--index", "3", "--attacks", "idlg",
                   "--defence", "none", "noise:1e-3", "prune:0.5", "--output", str(tmp_path)]) == 0
    assert len(calls) == 1, calls
    (folder,) = tmp_path.iterdir()
    runs = json.loads((folder / "results.json").read_text())["runs"]
    assert len(runs) == 3 and len({tuple(e["rank_deficiency"]) for e in runs}) == 1


@pytest.mark.slow
def test_defences_resume_and_merge(defended_run, tmp_path):
    folder = tmp_path / "killed"
    shutil.copytree(defended_run, folder)
    results = json.loads((folder / "results.json").read_text())
    del results["runs"][-1]["attacks"]["idlg"]  # the last pair lost its last attack
    (folder / "results.json").write_text(json.dumps(results))
    assert H.main([*GRID, "--resume", str(folder)]) == 0
    assert comparable(rows_of(folder)) == comparable(rows_of(defended_run))
    for shard in ("0/2", "1/2"):
        assert H.main([*GRID, "--output", str(tmp_path / "shards"), "--shard", shard]) == 0
    assert H.main(["--merge", *map(str, sorted((tmp_path / "shards").iterdir())), "--output", str(tmp_path / "m")]) == 0
    (merged,) = list((tmp_path / "m").iterdir())
    assert comparable(rows_of(merged)) == comparable(rows_of(defended_run))


def test_a_folder_from_before_defences_resumes_as_none(tmp_path):
    """Entries and grids written before --defence (no defence object, keys of two) are the
    undefended pairs: a resume finds them done."""
    args = ["--quick", "--source", "samples", "--model", "cnn2_c4", "--index", "3", "--attacks", "rgap"]
    out = tmp_path / "out"
    assert H.main([*args, "--output", str(out)]) == 0
    (folder,) = list(out.iterdir())
    results = json.loads((folder / "results.json").read_text())
    for entry in results["runs"]:
        del entry["defence"]
    del results["config"]["defences"]
    (folder / "results.json").write_text(json.dumps(results))
    before = rows_of(folder)
    assert H.main([*args, "--resume", str(folder)]) == 0
    assert rows_of(folder) == before  # nothing run again
    assert json.loads((folder / "grid.json").read_text())["cells"][0]["key"] == ["cnn2_c4", "samples:chelsea"]


def test_analyse_prints_the_ranks_under_pruning(capsys):
    assert H.main(["--analyse", "--model", "cnn2_c2", "--source", "samples", "--index", "3",
                   "--defence", "none", "prune:0.5"]) == 0
    out = capsys.readouterr().out
    assert "cnn2_c2 on samples:chelsea: security index -1470" in out
    assert "cnn2_c2 on samples:chelsea under prune:0.5: security index -1578" in out


# -- the study's scripts ------------------------------------------------------------------


def test_rgap_does_not_change_when_the_gradient_is_scaled(cnn2_c4):
    """What studies/noise_gain.py reads dp through: clipping scales the whole gradient, and
    R-GAP's answer is the same (the fc inversion is a ratio; each layer's equations scale together)."""
    model, grads = cnn2_c4
    ((x, deficiency, _),) = recursive_reconstruction([model], [grads])
    ((y, scaled_deficiency, _),) = recursive_reconstruction([model], [[g * 0.137 for g in grads]])
    assert scaled_deficiency == deficiency and torch.allclose(x, y, atol=1e-5)


def test_defence_table_finds_the_weakest_strength_that_stays_below_15_db():
    psnrs = {"m1": {"none": 30, "noise:1e-3": 20, "noise:1e-2": 14, "noise:1e-1": 10},
             "m2": {"none": 12, "noise:1e-3": 11}, "m3": {"none": 40, "noise:1e-3": 39},
             "m4": {"none": 40, "noise:1e-3": 9, "noise:1e-2": 18, "noise:1e-1": 8}}  # a chaotic attack's dip
    scored = lambda p: {"psnr": p, "ssim": 0.5, "seconds": 1.0, "label": 3, "label_correct": True}  # noqa: E731
    runs = [{"model": m, "image": "i", "defence": {"spec": s, "kind": s.split(":")[0]}, "attacks": {"rgap": scored(p)}}
            for m, by in psnrs.items() for s, p in by.items()]
    table = tables.defence_table(rows_in({"runs": runs}), report_names(), removing_equations())
    stopping = table.split("The weakest strength")[1]
    assert "| m1 | R-GAP | 0.01 (14.0) |" in stopping  # the weakest of the two below 15
    assert "| m2 | R-GAP | already |" in stopping and "| m3 | R-GAP | - |" in stopping
    assert "| m4 | R-GAP | 0.1 (8.0) |" in stopping  # not 1e-3: the stronger 1e-2 lets it through
