"""Draws assets/method.png, the diagram of the hybrid attack in the README.

Usage: python -m studies.method [PNG]   (default assets/method.png)
"""
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

CLIENT, ATTACK, HYBRID = "#dbe9f6", "#fde9c9", "#d9f0d3"
BOXES = {  # name: (x, y, width, height, colour, text)
    "image": (0.2, 3.1, 1.6, 0.9, CLIENT, "private image x\n(never seen)"),
    "net": (2.3, 3.1, 2.0, 0.9, CLIENT, "CNN: conv, act, ...,\nconv, act, fc"),
    "grad": (4.8, 3.1, 2.0, 0.9, CLIENT, "shared gradient g\n= dCE/dθ"),
    "fc": (7.4, 3.1, 2.4, 0.9, ATTACK, "fc layer: a = gWᵀgb / gbᵀgb\ndL/da = Wᵀ gb"),
    "inv": (7.4, 1.6, 2.4, 0.9, ATTACK, "z = act⁻¹(a)\nδ = dL/da ⊙ act′(z)"),
    "lsq": (4.8, 1.6, 2.0, 0.9, ATTACK, "U = [M; G(δ)], V = [z − b; gW]\nx̂ = argmin ‖Ux − V‖ (min-norm)"),
    "gm": (2.3, 1.6, 2.0, 0.9, HYBRID, "gradient matching from x̂:\ncos + TV + ‖Ux − V‖² (Adam)"),
    "down": (2.3, 0.1, 2.0, 0.9, ATTACK, "a ← x, dL/da ← Mᵀδ\nnext layer down"),
    "out": (0.2, 1.6, 1.6, 0.9, HYBRID, "layer 0:\nthe image estimate"),
}
ARROWS = [("image", "net"), ("net", "grad"), ("grad", "fc"), ("fc", "inv"), ("inv", "lsq"),
          ("lsq", "gm"), ("gm", "down"), ("gm", "out")]


def ends(a: str, b: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """From the edge of box a facing box b to the facing edge of b."""
    (xa, ya, wa, ha, *_), (xb, yb, wb, hb, *_) = BOXES[a], BOXES[b]
    if abs(ya - yb) < 0.1:  # side by side
        left, right = (a, b) if xa < xb else (b, a)
        (xl, yl, wl, hl, *_), (xr, *_) = BOXES[left], BOXES[right]
        pts = (xl + wl + 0.08, yl + hl / 2), (xr - 0.08, yl + hl / 2)
        return pts if left == a else pts[::-1]
    x = (max(xa, xb) + min(xa + wa, xb + wb)) / 2  # one above the other
    top = ya + ha / 2 > yb + hb / 2
    return ((x, ya - 0.08), (x, yb + hb + 0.08)) if top else ((x, ya + ha + 0.08), (x, yb - 0.08))


def draw(path: Path) -> None:
    fig = Figure(figsize=(10, 4.6))
    ax = fig.add_axes([0, 0, 1, 0.9])
    ax.set_xlim(0, 10)
    ax.set_ylim(-0.1, 4.2)
    ax.set_axis_off()
    for x, y, w, h, colour, text in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="0.3"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5)
    for a, b in ARROWS:
        ax.add_patch(FancyArrowPatch(*ends(a, b), arrowstyle="-|>", mutation_scale=14, color="0.25"))
    # the recursion: from "next layer down" back to the inverse activation
    ax.add_patch(FancyArrowPatch((4.38, 0.55), (8.6, 1.52), connectionstyle="arc3,rad=0.25",
                                 arrowstyle="-|>", mutation_scale=14, color="0.25", ls="--"))
    ax.text(7.2, 0.45, "for l = L−2, ..., 0", fontsize=8.5, style="italic")
    fig.suptitle("Hybrid attack (Chen and Campbell, BMVC 2022): blue, the client; orange, R-GAP's "
                 "recursion; green, the hybrid's correction", fontsize=9.5)
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    draw(Path(sys.argv[1] if len(sys.argv) > 1 else "assets/method.png"))
