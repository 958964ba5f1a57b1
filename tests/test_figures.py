"""The study figures, drawn from committed runs: no text leaves the canvas, no legend lies
over an axis's labels, no SSIM bar passes 1, and a capped mean shows its worst image."""
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from leakage import report, tables
from leakage.record import report_names, rows_in

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def study_rows(name: str) -> list[dict]:
    return report.undefended(rows_in(json.loads((ASSETS / name).read_text())))


def drawn(fig):
    """The figure laid out and drawn (constrained layout places everything at draw), and its renderer."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    return renderer


def drawn_texts(fig) -> list[Text]:
    """Every text the figure draws: tick labels only of ticks within their axis's view (those
    outside keep a position but are not drawn)."""
    ticks, shown = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks |= {tick.label1, tick.label2}
                if lo - 1e-9 * (hi - lo) <= tick.get_loc() <= hi + 1e-9 * (hi - lo):
                    shown += [tick.label1, tick.label2]
    others = [t for t in fig.findobj(Text) if t not in ticks]
    return [t for t in others + shown if t.get_visible() and t.get_text().strip()]


def texts_outside(fig, renderer) -> list[str]:
    """Every drawn text whose extent leaves the canvas (a pixel of slack)."""
    canvas = fig.bbox
    out = []
    for t in drawn_texts(fig):
        if t.figure is not None:
            box = t.get_window_extent(renderer)
            if box.x0 < canvas.x0 - 1 or box.x1 > canvas.x1 + 1 or box.y0 < canvas.y0 - 1 or box.y1 > canvas.y1 + 1:
                out.append(t.get_text()[:40])
    return out


def legend_overlaps(fig, renderer) -> list[str]:
    """Axis labels and tick labels that a legend's box overlaps."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    out = []
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            for t in [ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]:
                if t.get_visible() and t.get_text().strip() and box.overlaps(t.get_window_extent(renderer)):
                    out.append(t.get_text()[:40])
    return out


@pytest.mark.parametrize("name", ["heldout.json", "study_cifar_random.json"])
@pytest.mark.parametrize("which", list(report.INDICES))
def test_a_study_figure_keeps_its_text_on_the_canvas_and_its_legend_off_the_labels(name, which, tmp_path):
    fig = report.plot_index_vs_quality(study_rows(name), tmp_path / "f.png", report_names(), which)
    renderer = drawn(fig)
    assert texts_outside(fig, renderer) == []
    assert legend_overlaps(fig, renderer) == []
    assert small_at_readme_width(fig) == []
    assert leaders_crossing_labels(fig, renderer) == []


def small_at_readme_width(fig) -> list[str]:
    """Texts smaller than report.SMALLEST_PX once the figure is shown report.README_PX wide
    (the heldout figure's 40 labels were about 6 px there)."""
    scale = report.README_PX / (fig.get_figwidth() * 72)  # pixels at README width per point
    return [f"{t.get_text()[:30]} ({t.get_size() * scale:.1f} px)" for t in drawn_texts(fig)
            if t.get_size() * scale < report.SMALLEST_PX - 1e-6]


def leaders_crossing_labels(fig, renderer) -> list[str]:
    """Model labels above a study figure that a leader line (another label's, or its own
    beyond its foot) passes through."""
    from matplotlib.text import Annotation

    notes = [t for t in fig.findobj(Annotation) if t.arrow_patch is not None]
    boxes = [(n, Text.get_window_extent(n, renderer)) for n in notes]  # the text alone (not with its line)
    out = []
    for n in notes:
        path = n.arrow_patch.get_path().transformed(n.arrow_patch.get_transform())
        points = path.interpolated(50).vertices
        for other, box in boxes:
            inside = [(x, y) for x, y in points if box.x0 + 0.5 < x < box.x1 - 0.5 and box.y0 + 0.5 < y < box.y1 - 0.5]
            if inside:
                out.append(f"{n.get_text()[:20]} through {other.get_text()[:20]}")
    return out


def test_the_defence_figure_keeps_its_text_on_the_canvas_and_its_ticks_apart(tmp_path):
    rows = [r for f in sorted(ASSETS.glob("defences_*_results.json")) for r in rows_in(json.loads(f.read_text()))]
    fig = tables.plot_defence_table(rows, tmp_path / "d.png", report_names())
    renderer = drawn(fig)
    assert texts_outside(fig, renderer) == []
    assert legend_overlaps(fig, renderer) == []
    for ax in fig.axes:  # no two tick labels of one axis overlap (prune's 0.9, 0.95, 0.99) or nearly touch
        boxes = sorted((t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()),
                       key=lambda box: box.x0)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), ax.get_title()
        assert all(b.x0 - a.x1 >= a.width / 2 for a, b in zip(boxes, boxes[1:])), ax.get_title()  # prune's 0, 0.2
    assert small_at_readme_width(fig) == []
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any("dp" in t and "standard deviation Z C" in t for t in titles), titles  # not "dp (Z C)" alone
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "R-GAP (means over 5 images)" in labels and "DLG (means over 3 images)" in labels


def test_no_ssim_bar_passes_1_and_a_capped_mean_shows_its_worst_image(tmp_path):
    rows = study_rows("study_cifar_random.json")
    fig = report.plot_index_vs_quality(rows, tmp_path / "f.png", report_names())
    drawn(fig)
    ssim_axes = [ax for ax in fig.axes if ax.get_ylabel() == "SSIM" or ax.get_ylim()[1] < 2]
    for ax in ssim_axes:
        for line in ax.get_lines():
            assert np.nanmax(line.get_ydata(), initial=-np.inf) <= 1 + 1e-9
        for collection in ax.collections:  # the error bars' segments
            for segment in collection.get_segments():
                assert segment[:, 1].max() <= 1 + 1e-9
    worst = min(r["psnr"] for r in rows if r["model"] == "lenet" and r["attack"] == "rgap")
    assert worst < 11  # lenet's mean is above the cap; its image 16 is at 10.1 dB
    marked = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "v"]
    assert any(np.isclose(line.get_ydata()[0], worst) for line in marked)


# -- the comparison figure says what a reader needs (#44, item 19) ---------------------------


def comparison(tmp_path, target=True, gradient=None, config=None):
    run = {"model": "m", "image": "mnist-test:0", "label": 3 if target else None, "defence": {"spec": "none"},
           "target": {"npy": "t.npy"} if target else None,
           "attacks": {"rgap": {"npy": "r.npy", "psnr": 30.0, "ssim": 0.5, "label": 3},
                       "dlg": {"npy": "r.npy", "psnr": 20.0, "ssim": 0.8, "label": 2}}}
    if gradient:
        run["gradient"] = gradient
    np.save(tmp_path / "t.npy", np.full((28, 28, 1), 0.5, np.float32))
    np.save(tmp_path / "r.npy", np.full((28, 28, 1), 0.25, np.float32))
    names = report_names({"source": "mnist-test"})
    budget = report.budget_text(config or {}, names)
    fig = report.plot_comparison([run], tmp_path, tmp_path / "c.png", names, budget)
    axes = fig.subfigs[0].axes
    return fig, {ax.get_title(): ax.get_xlabel() for ax in axes}, fig.subfigs[0].get_suptitle()


def test_the_comparison_marks_the_best_attack_by_each_measure_and_a_wrong_label(tmp_path):
    _, said, _ = comparison(tmp_path)
    assert "best PSNR" in said["R-GAP"] and "best SSIM" not in said["R-GAP"] and "label" not in said["R-GAP"]
    assert "best SSIM" in said["DLG"] and "label 2, wrong" in said["DLG"]


def test_the_comparison_shows_the_label_used_where_nothing_is_scored(tmp_path):
    _, said, _ = comparison(tmp_path, target=False)
    assert said["R-GAP"] == "not scored\nlabel 3" and "best" not in said["DLG"]


def test_the_comparison_names_a_captured_gradient_beside_its_image(tmp_path):
    _, _, title = comparison(tmp_path, gradient="gradient:g.pt@0123456789")
    assert "mnist-test:0" in title and "gradient:g.pt@0123456789" in title


def test_the_comparison_is_readable_at_a_readmes_width_with_every_attack(tmp_path):
    run = {"model": "m", "image": "samples:chelsea", "label": 3, "defence": {"spec": "none"},
           "target": {"npy": "t.npy"}, "attacks": {a: {"npy": "r.npy", "psnr": 20.0 + i, "ssim": 0.5, "label": 3}
                       for i, a in enumerate(["rgap", "dlg", "idlg", "cosine", "hybrid", "hybrid_free"])}}
    np.save(tmp_path / "t.npy", np.full((32, 32, 3), 0.5, np.float32))
    np.save(tmp_path / "r.npy", np.full((32, 32, 3), 0.25, np.float32))
    names = report_names({})
    fig = report.plot_comparison([run], tmp_path, tmp_path / "c.png", names,
                                 report.budget_text({"attacks": list(run["attacks"]), "dlg_iters": 5}, names))
    drawn(fig)
    assert fig.get_figwidth() > 11 and small_at_readme_width(fig) == []  # seven columns: 8 points would be 8 px


def test_the_comparison_says_its_budget_and_when_it_is_below_the_papers(tmp_path):
    quick = {"attacks": ["rgap", "dlg", "hybrid"], "dlg_iters": 5, "hybrid_iters_first": 100, "hybrid_iters": 20,
             "restarts": 1}
    fig, _, _ = comparison(tmp_path, config=quick)
    assert fig.get_suptitle() == "DLG 5 steps; Hybrid N0 100 N 20  (below the paper's budget: --quick?)"
    paper = quick | {"dlg_iters": 300, "hybrid_iters_first": 10000, "hybrid_iters": 2000}
    assert report.budget_text(paper, report_names({})) == "DLG 300 steps; Hybrid N0 10000 N 2000"
