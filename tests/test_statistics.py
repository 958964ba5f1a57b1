"""The intervals behind every correlation: the bootstrap covers a rank correlation known in
advance, the cluster bootstrap widens where points share their cluster, differences are
tested by their own interval, and the resampled statistics are scipy's."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import hybrid as H
from leakage import report, tables
from leakage.runtime import code_commit
from conftest import QUICK, the_folder


def bivariate(n: int, r: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n)
    return x, r * x + math.sqrt(1 - r * r) * rng.standard_normal(n)


def test_the_interval_covers_the_true_rho_about_95_times_in_100():
    """Normal pairs of correlation r have Spearman's rho (6/pi) asin(r/2) (Pearson 1907): over
    100 samples of 40, the interval must cover it about 95 times (a 50% interval, or none,
    would not)."""
    r = 0.6
    truth = 6 / math.pi * math.asin(r / 2)
    covered = 0
    for seed in range(100):
        x, y = bivariate(40, r, seed)
        lo, hi = report.rank_correlation(list(x), list(y))["ci95"]
        covered += lo <= truth <= hi
    assert 88 <= covered <= 100


def test_a_cluster_bootstrap_is_wider_than_the_naive_one_on_clustered_data():
    """30 models of 20 images each: every image of a model shares its index and most of its
    PSNR. Resampling points treats 600 points as independent; there are 30."""
    rng = np.random.default_rng(0)
    per_model = rng.integers(-20, 0, 30).astype(float)
    index = np.repeat(per_model, 20)
    psnr = np.repeat(per_model / 5 + rng.standard_normal(30) * 3, 20) + rng.standard_normal(600) * 0.3
    clusters = np.repeat(np.arange(30), 20)
    naive = report.rank_correlation(list(index), list(psnr))
    clustered = report.rank_correlation(list(index), list(psnr), list(clusters))
    width = lambda c: c["ci95"][1] - c["ci95"][0]  # noqa: E731
    assert width(clustered) > 2 * width(naive)
    assert clustered["spearman_p"] is None and clustered["kendall_p"] is None and naive["spearman_p"] is not None
    assert clustered["spearman_rho"] == naive["spearman_rho"] and clustered["clusters"] == 30


def test_resampled_statistics_are_scipys():
    x, y = bivariate(30, 0.3, 1)
    x = np.round(x, 1)  # ties
    groups = [0, 0, 1, 2, 2, 2, *range(3, 27)]
    rhos, taus = report.resampled_correlations(list(x), list(y), groups, resamples=5, seed=3)
    draws = np.random.default_rng(3).integers(27, size=(5, 27))
    members = [np.flatnonzero(np.array(groups) == g) for g in range(27)]
    for draw, rho, tau in zip(draws, rhos, taus):
        take = np.concatenate([members[g] for g in draw])
        assert rho == pytest.approx(stats.spearmanr(x[take], y[take])[0], abs=1e-12)
        assert tau == pytest.approx(stats.kendalltau(x[take], y[take])[0], abs=1e-12)
    single, taus1 = report.resampled_correlations(list(x), list(y), resamples=5, seed=3)  # the sign-matrix path
    for draw, tau in zip(np.random.default_rng(3).integers(30, size=(5, 30)), taus1):
        assert tau == pytest.approx(stats.kendalltau(x[draw], y[draw])[0], abs=1e-12)


def test_a_difference_is_one_only_where_its_interval_excludes_zero():
    x, y = bivariate(40, 0.6, 0)
    same = report.difference((x, y, list(range(40))), (x, y, list(range(40))), paired=True)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and "*" not in tables.show_difference(same)
    u, v = bivariate(40, -0.6, 1)
    apart = report.difference((x, y, list(range(40))), (u, v, list(range(40))), paired=False)
    assert apart["ci95"][0] > 0 and tables.show_difference(apart).endswith("*")
    x2, y2 = bivariate(40, 0.6, 2)
    alike = report.difference((x, y, list(range(40))), (x2, y2, list(range(40))), paired=False)
    assert alike["ci95"][0] < 0 < alike["ci95"][1] and "*" not in tables.show_difference(alike)


def test_intervals_regenerate_to_the_bit():
    x, y = bivariate(35, 0.5, 7)
    assert report.rank_correlation(list(x), list(y)) == report.rank_correlation(list(x), list(y))


def test_the_order_the_points_come_in_changes_no_interval():
    x, y = bivariate(30, 0.4, 4)
    units = [f"m{i % 10}" for i in range(30)]
    order = np.random.default_rng(1).permutation(30)
    first = report.rank_correlation(list(x), list(y), units)
    again = report.rank_correlation(list(x[order]), list(y[order]), [units[i] for i in order])
    assert first["ci95"] == again["ci95"] and first["kendall_ci95"] == again["kendall_ci95"]


def test_a_run_records_its_commit_and_the_wall_time_of_every_stretch(tmp_path):
    """results.json says which code made it and how long each stretch took: a resume adds one."""
    assert H.main([*QUICK, "--model", "cnn2_c1", "--index", "0", "3", "--output", str(tmp_path)]) == 0
    folder = the_folder(tmp_path)
    results = json.loads((folder / "results.json").read_text())
    assert results["commit"] == code_commit()  # None outside a git checkout
    if (Path(H.__file__).parent / ".git").exists():
        assert results["commit"]
    (first,) = results["stretches"]
    assert first["parts_done"] == 2 and first["seconds"] > 0 and first["commit"] == results["commit"]
    results["runs"].pop()  # as if the run had stopped before its last cell
    (folder / "results.json").write_text(json.dumps(results))
    assert H.main([*QUICK, "--model", "cnn2_c1", "--index", "0", "3", "--resume", str(folder)]) == 0
    again = json.loads((folder / "results.json").read_text())["stretches"]
    assert len(again) == 2 and again[0] == first and again[1]["parts_done"] == 1
