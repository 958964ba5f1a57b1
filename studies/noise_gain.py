"""Does a quantity computable without the attacked image predict what gradient noise costs
R-GAP? The candidate: the noise's gain through R-GAP's recursion, measured on a stand-in
image that is not attacked.

For each model, on the stand-in: R-GAP on the client's gradient, and on it plus N(0, s0^2)
in every entry (`noise:s0`, K draws); gain = the RMS change per pixel divided by s0 (to first
order the recursion passes the noise on linearly). Its prediction for an attacked image
under noise:SIGMA: the noise adds (gain SIGMA)^2 to the attack's squared error per pixel.
This is compared, per (model, SIGMA) over the attacked images, with the error the defence
study measured: mean MSE under the noise minus mean MSE without it.

Usage: python -m studies.noise_gain DEFENCE_STUDY.json [MORE.json ...] [--standin 19] [--s0 1e-4] [--draws 3] > table.md
(several results.json of one study, e.g. its grid's and its added points', are read as one)
"""
import sys

import numpy as np
from scipy import stats

import hybrid as H
from leakage.attacks import ATTACKS
from leakage.data import PrivateImage, load_test_split
from leakage.defences import defend, parse_defence
from leakage.modules import build_model
from leakage.paper import client_gradient, recursive_reconstruction
from leakage.runtime import configure_torch
from studies.common import Parser, Refused, printed, read_results


def gain(model_name: str, standin: PrivateImage, s0: float, draws: int) -> float:
    """RMS change per pixel of R-GAP's image per unit of the noise's standard deviation."""
    model = build_model(model_name)
    grads = client_gradient(model, standin.x, standin.label)
    ((clean, *_),) = recursive_reconstruction([model], [grads])
    changes = []
    for seed in range(draws):
        noisy, _ = defend(grads, parse_defence(f"noise:{s0:g}"), seed)
        ((x, *_),) = recursive_reconstruction([model], [noisy])
        changes.append(float((x.double() - clean.double()).square().mean()))
    return float(np.sqrt(np.mean(changes))) / s0


def measured_mse(run: dict, attack: str) -> dict[tuple[str, str], float]:
    """(model, defence spec) -> mean over images of the attack's MSE per pixel (from its PSNR)."""
    out: dict[tuple[str, str], list[float]] = {}
    for e in run["runs"]:
        a = e.get("attacks", {}).get(attack)
        if a is None:
            continue
        mse = 0.0 if a["psnr"] is None else 10 ** (-a["psnr"] / 10)  # PSNR with data range 1
        out.setdefault((e["model"], e.get("defence", {}).get("spec", "none")), []).append(mse)
    return {k: float(np.mean(v)) for k, v in out.items()}


def effective_sigmas(run: dict) -> dict[tuple[str, str], list[float]]:
    """(model, dp spec) -> per image, the noise's std relative to the gradient as shared
    before clipping: Z C / min(1, C / |g|). R-GAP's answer does not change when the whole
    gradient is scaled (the fc inversion is a ratio, and every layer's equations scale
    together), so dp:C:Z is to it noise of this std on the unclipped gradient."""
    out: dict[tuple[str, str], list[float]] = {}
    for e in run["runs"]:
        d = e.get("defence", {})
        if d.get("kind") == "dp" and e.get("attacks"):
            scale = min(1.0, d["clip"] / d["norm_before"])
            out.setdefault((e["model"], d["spec"]), []).append(d["noise_multiplier"] * d["clip"] / scale)
    return out


def dp_lines(run: dict, gains: dict[str, float], models: list[str]) -> list[str]:
    """The same prediction for dp, through its effective noise (an extension: the noise's
    formula was fixed before the study, this reading of dp after)."""
    mse, sigmas = measured_mse(run, "rgap"), effective_sigmas(run)
    keys = [k for k in sigmas if (k[0], "none") in mse and k in mse]
    if not keys:
        return []
    lines = ["R-GAP under dp:C:Z, read as noise of std Z C / min(1, C/|g|) on the unclipped gradient "
             "(R-GAP is invariant to the gradient's scale; an extension made after the study, not a prediction "
             "fixed before it):", "",
             "| model | spec | effective SIGMA (mean) | added MSE, measured | predicted | ratio |",
             "|---|---|---|---|---|---|"]
    for m, spec in sorted(keys, key=lambda k: (models.index(k[0]), k[1])):
        p = float(np.mean([(gains[m] * s) ** 2 for s in sigmas[m, spec]]))
        a = mse[m, spec] - mse[m, "none"]
        lines.append(f"| {m} | {spec} | {np.mean(sigmas[m, spec]):.3g} | {a:.3g} | {p:.3g} | {a / p:.3g} |")
    return lines + [""]


def table(paths: list[str], standin_index: int, s0: float, draws: int) -> str:
    run = {"runs": [e for path in paths for e in read_results(path)["runs"]]}
    if not any(e["defence"]["spec"].startswith("noise:") for e in run["runs"]):
        raise Refused(f"{', '.join(paths)}: no noise:SIGMA defence, which this table reads")
    (standin,), _ = load_test_split("cifar10-test", [standin_index], H.DATA_PATH)
    models = list(dict.fromkeys(e["model"] for e in run["runs"]))
    gains = {m: gain(m, standin, s0, draws) for m in models}
    lines = [f"The noise's gain through R-GAP's recursion on {standin.name} (s0 = {s0:g}, {draws} draws), and the "
             "squared error per pixel that noise:SIGMA added in the study (mean over images, under the noise minus "
             "without it), against the gain's prediction (gain SIGMA)^2.", ""]
    for attack in ("rgap", "hybrid"):
        mse = measured_mse(run, attack)
        pairs = [(m, spec) for m, spec in mse if spec.startswith("noise:") and (m, "none") in mse]
        if not pairs:
            continue
        lines += [f"{ATTACKS[attack].shown}:", "",
                  "| model | gain | SIGMA | added MSE, measured | predicted | ratio |",
                  "|---|---|---|---|---|---|"]
        predicted, added = [], []
        for m, spec in sorted(pairs, key=lambda k: (models.index(k[0]), parse_defence(k[1]).params["sigma"])):
            sigma = parse_defence(spec).params["sigma"]
            p, a = (gains[m] * sigma) ** 2, mse[(m, spec)] - mse[(m, "none")]
            predicted.append(p)
            added.append(a)
            lines.append(f"| {m} | {gains[m]:.3g} | {sigma:g} | {a:.3g} | {p:.3g} | {a / p:.3g} |")
        rho, p_value = stats.spearmanr(predicted, added)
        lines += ["", f"Spearman's rho of predicted against measured over the {len(added)} (model, SIGMA): "
                      f"{rho:+.3f} (p {p_value:.2g}).", ""]
    return "\n".join(lines + dp_lines(run, gains, models)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m studies.noise_gain")
    p.add_argument("studies", nargs="+")
    p.add_argument("--standin", type=int, default=19, help="CIFAR-10 test image the gain is measured on")
    p.add_argument("--s0", type=float, default=1e-4)
    p.add_argument("--draws", type=int, default=3)
    a = p.parse_args(argv)
    configure_torch("cpu", 1)
    return printed(p.prog, lambda: table(a.studies, a.standin, a.s0, a.draws))


if __name__ == "__main__":
    sys.exit(main())
