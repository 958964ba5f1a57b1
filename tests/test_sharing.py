"""The attacks of one cell share the recursion's steps: each attack's answer is what it gives
alone, to the bit; hybrid_free where it corrects every layer is the hybrid's, and where it
corrects none R-GAP's, marked derived; no step is run twice."""
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import hybrid as H
from leakage.experiment import Answer, share_and_attack
from leakage.modules import build_model
from leakage.paper import gradient_matching, solve_layer
from leakage.runtime import PUBLISHED_SEED
from leakage.settings import AttackSettings
from leakage.solvers import MEMO
from studies import benchmark_table, projected_study

TINY = dataclasses.replace(AttackSettings(), dlg_iters=1, cosine_iters=10, hybrid_iters=4, hybrid_iters_first=10)
LINEAR = ["rgap", "hybrid", "hybrid_free"]


def answers(model, image, attacks):
    return {e.attack: e for _, e in share_and_attack([(model, image)], attacks, TINY, PUBLISHED_SEED, "cpu")
            if isinstance(e, Answer)}


@pytest.mark.parametrize("name, derived", [("cnn2_c2", "hybrid"), ("cnn2_c1", "rgap"), ("cnn3_c4", None)])
def test_shared_steps_give_each_attack_its_own_answer_to_the_bit(chelsea, name, derived):
    """cnn2_c2 is deficient at its one convolution (hybrid_free corrects it, as the hybrid
    does), cnn2_c1 full rank (it corrects nothing), cnn3_c4 [-2146, 0] (it leaves the top
    layer to R-GAP, then corrects)."""
    model = build_model(name)
    together = answers(model, chelsea, LINEAR)
    for attack in LINEAR:
        alone = answers(model, chelsea, [attack])[attack]
        assert torch.equal(torch.as_tensor(alone.recon), torch.as_tensor(together[attack].recon)), attack
        assert alone.entry["psnr"] == together[attack].entry["psnr"]
        assert "derived_from" not in alone.entry
    assert together["hybrid_free"].entry.get("derived_from") == derived
    assert "derived_from" not in together["hybrid"].entry and "derived_from" not in together["rgap"].entry


def test_no_step_is_run_twice_within_a_cell(chelsea, monkeypatch):
    """cnn2_c2: R-GAP solves its one layer, the hybrid takes that solve and corrects it,
    hybrid_free takes both: one solve and one correction in all."""
    calls = {"solve": 0, "correct": 0}
    solve, correct = solve_layer, gradient_matching

    def counted(kind, f):
        def run(*args, **kwargs):
            calls[kind] += 1
            return f(*args, **kwargs)
        return run
    monkeypatch.setattr("leakage.paper.solve_layer", counted("solve", solve))
    monkeypatch.setattr("leakage.paper.gradient_matching", counted("correct", correct))
    answers(build_model("cnn2_c2"), chelsea, LINEAR)
    assert calls == {"solve": 1, "correct": 1}


def test_steps_are_not_shared_between_cells(chelsea, photographs):
    """Another image is another gradient: nothing of one cell's steps reaches the next."""
    model = build_model("cnn2_c2")
    answers(model, chelsea, ["rgap"])
    assert MEMO.get() is None
    first = answers(model, photographs[0], ["hybrid_free"])["hybrid_free"]
    assert "derived_from" not in first.entry


HELDOUT = Path(H.__file__).parent / "assets" / "heldout.json"


def moved_record(path: Path, moves: dict[int, float]) -> str:
    """heldout.json with the hybrid's PSNR of entry i moved by moves[i], written to path."""
    results = json.loads(HELDOUT.read_text())
    for entry, by in moves.items():
        results["runs"][entry]["attacks"]["hybrid"]["psnr"] += by
    path.write_text(json.dumps(results))
    return str(path)


def test_the_benchmark_table_compares_speed_and_numbers(tmp_path, capsys):
    """Two sides with the same numbers: their speed ratio, no PSNR difference, every pair equal;
    one PSNR moved by 0.25 dB is reported and its pair no longer counted equal."""
    record = HELDOUT
    assert benchmark_table.main([str(record), "100", str(record), "50"]) == 0
    out = capsys.readouterr().out
    assert "2.00x the pairs per hour" in out and "difference 0.0000 dB" in out and "200 of 200 pairs equal" in out
    assert benchmark_table.main([str(record), "100", moved_record(tmp_path / "moved.json", {0: 0.25}), "100"]) == 0
    out = capsys.readouterr().out
    assert "difference 0.2500 dB" in out and "199 of 200 pairs equal" in out
    assert "+0.2500" in out and re.search(r"new 1 of (\d+)\.", out)


def test_the_benchmark_table_counts_the_moves_the_old_code_makes_of_itself(tmp_path, capsys):
    """With --floor, a PSNR the old code moves beyond 0.01 dB of itself is not counted against
    the new side; one it holds is, however small the new side's other moves. A (model, attack)
    counts as held only where every image is."""
    record = HELDOUT
    runs = json.loads(record.read_text())["runs"]
    twin = next(i for i, e in enumerate(runs) if e["model"] == runs[0]["model"] and e["image"] != runs[0]["image"])

    def table(new: dict[int, float], floor: dict[int, float]) -> str:
        assert benchmark_table.main([str(record), "100", moved_record(tmp_path / "new.json", new), "50",
                                     "--floor", moved_record(tmp_path / "floor.json", floor)]) == 0
        return capsys.readouterr().out

    psnrs, groups = len(benchmark_table.psnrs(str(record))), 3 * len({e["model"] for e in runs})
    assert (f"new 1 of {psnrs}; the old side elsewhere 1. Of the {psnrs - 1} PSNRs the old side holds within 0.01 dB "
            f"of itself, new moves 0 beyond it (largest 0.0050 dB). Of the {groups - 1} (model, attack)s it holds so "
            "on every image, new moves 0 (largest 0.0050 dB)") in table({0: 0.25, 1: 0.005}, {0: -0.1})
    out = table({0: 0.25, 1: 0.005}, {1: -0.1})
    assert "new moves 1 beyond it (largest 0.2500 dB)" in out and "new moves 1 (largest 0.2500 dB)" in out
    out = table({0: 0.25}, {twin: -0.1})  # the floor moves the same model and attack on another image
    assert "new moves 1 beyond it (largest 0.2500 dB)" in out and "new moves 0 (largest 0.0000 dB)" in out
    assert benchmark_table.main([str(record), "100", str(record), "50", "--floor", str(tmp_path / "none.json")]) == 2


def test_the_projection_counts_hybrid_frees_answers_that_stay_equal_to_the_bit(tmp_path, capsys):
    """projected_study says on how many of the study's pairs where hybrid_free equals the
    hybrid (or R-GAP) to the bit the run's does too: a run that moves one of each loses one."""
    record = Path(H.__file__).parent / "assets" / "projection_cifar.json"
    assert projected_study.main([str(record)]) == 0
    out = capsys.readouterr().out
    counts = re.search(r"hybrid's on (\d+) of the (\d+) pairs.*R-GAP's on (\d+) of the (\d+) pairs", out).groups()
    assert counts[0] == counts[1] and counts[2] == counts[3] and int(counts[1]) > 0 and int(counts[3]) > 0
    moved = json.loads(record.read_text())
    for other in ["hybrid", "rgap"]:
        entry = next(e for e in moved["runs"] if e["attacks"]["hybrid_free"]["psnr"] == e["attacks"][other]["psnr"])
        entry["attacks"]["hybrid_free"]["psnr"] += 1e-9
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    assert projected_study.main([str(tmp_path / "moved.json")]) == 0
    out = capsys.readouterr().out
    assert (f"hybrid's on {int(counts[0]) - 1} of the {counts[1]} pairs" in out
            and f"R-GAP's on {int(counts[2]) - 1} of the {counts[3]} pairs" in out)
