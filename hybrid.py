"""Training-data leakage from gradients: linear systems and gradient matching.

Reference reproduction of

    Cangxiong Chen and Neill D. F. Campbell, "Analysing Training-Data Leakage from
    Gradients through Linear Systems and Gradient Matching", BMVC 2022
    (arXiv:2210.13231).

A client computes the cross-entropy gradient of one image (CIFAR-10's 3x32x32 in the
paper; CIFAR-100, MNIST and Fashion-MNIST too) on a small CNN and shares it. From the
architecture, the weights and that gradient alone, this script reconstructs the image
with the paper's hybrid attack (a least-squares solve of each layer's linear system,
corrected by gradient matching) and with the baselines R-GAP, DLG, iDLG and Cosine+TV;
it scores them with PSNR and SSIM and reports each layer's rank deficiency, the paper's
security index and our worst layer's fraction of free unknowns.

Examples:

    python hybrid.py --quick --source samples         # smoke test, under a minute on a CPU
    python hybrid.py                                   # paper settings: cnn4_c2, CIFAR-10 #3
    python hybrid.py --model cnn2_c1 cnn2_c2 cnn4_c1 cnn4_c2 --index 3 7   # the paper's grid
    python hybrid.py --analyse --model cnn3_c1 cnn4_c2 # rank deficiency + both indices only
    python hybrid.py --analyse --model 8k3s1p0-tanh,4k4s2p0-leaky,fc-id   # your own architecture
    python hybrid.py --model random:40 --index 0-4 --attacks rgap hybrid   # 40 random architectures
    python hybrid.py --attacks rgap hybrid hybrid_free # and ours: correct only where the ranks leave freedom
    python hybrid.py --image cat.png --label 3 --model cnn2_c1 --attacks rgap
    python hybrid.py --source mnist-test --index 0-3 --attacks rgap idlg   # MNIST's 1x28x28, 10 classes
    python hybrid.py --model lenet.py:LeNet --init uniform:0.5 --source mnist-test   # your nn.Module
    python hybrid.py --attacks dlg idlg --restarts 4   # the baselines, each the best of 4 starts
    python hybrid.py --model all --source samples --index 0-4 --attacks rgap hybrid --jobs auto
                                                       # does the security index predict leakage?
    python hybrid.py --model 'cnn3_*' --train-steps 500 --attacks rgap hybrid   # on trained weights
    python hybrid.py --model cnn4_c2 --index 0-99 --quick --shard 0/4   # a quarter of a sweep
    python hybrid.py --merge output/*_cnn4_c2*         # its shards, summarised

This is the command you run and edit: its two paths come first. The paper itself is
leakage/paper.py, top to bottom in the order its data flows (the client's gradient and its
label; each layer's equations; R-GAP's recursion; the security index and our worst layer's
fraction; the hybrid and hybrid_free). Every other concern has a room of its own in leakage/:

    settings.py, cli.py    the settings (each declared once, with its flag) and the command line
    data.py                CIFAR-10 (CIFAR-100, MNIST, Fashion-MNIST), photographs, your files
    models.py              the published zoo, architecture strings, random:N, weights, --init
    modules.py             your own nn.Module (--model PATH.py:NAME, read with torch.fx)
    activations.py         one row per activation
    training.py            trained weights (--train-steps)
    gradients.py           the gradient an attack is handed: computed, or captured (--gradient)
    solvers.py             the numerics under the paper's systems, and the memo of shared steps
    matching.py            what the attacks return, and what gradient matching shares
    baselines.py           DLG, iDLG and Cosine+TV
    attacks.py             ATTACKS, one row per attack
    defences.py            DEFENCES, one row per kind: none, noise, prune, dp
    metrics.py             PSNR and SSIM
    experiment.py          one cell (model, image, defence), cells batched, --analyse
    record.py              results.json: rows, older records, what sweeps.py is handed
    api.py                 the same from Python: hybrid.attack and hybrid.analyse
    sweeps.py, report.py   long runs (folders, resume, shards, workers, merge), and what a
                           run folder says (summaries, correlations, figures)
    tables.py              the study tables the scripts of studies/ print
    console.py, flags.py   lines for the user, and settings that are flags

To add an attack: its function and one row of ATTACKS; a defence: its function and one
row of DEFENCES; an activation: one row of ACTIVATIONS; a setting: one field declared with
flags.setting (docs/extending.md). Where this departs from the published code, and why:
docs/departures.md.
"""
import sys

# -----------------------------------------------------------------------------
# Paths users edit (the command line overrides both)
OUTPUT_PATH = "output"  # each run writes a new folder under here
DATA_PATH = "data"  # CIFAR-10 lives (or is downloaded) here
# -----------------------------------------------------------------------------

try:  # the libraries take seconds to load: a Ctrl-C meanwhile ends quietly, as it does later
    from leakage import cli
    from leakage.api import analyse, attack  # noqa: F401 (the Python API: hybrid.attack, hybrid.analyse)
except KeyboardInterrupt:
    raise SystemExit(130) from None
except ImportError as e:  # a Ctrl-C inside an extension's import (numpy's) reaches here as its ImportError
    cause = e
    while cause is not None and not isinstance(cause, KeyboardInterrupt):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        raise
    raise SystemExit(130) from None


def main(argv: list[str] | None = None) -> int:
    """python hybrid.py ARGS, with the two paths above."""
    return cli.main(argv, cli.Paths(OUTPUT_PATH, DATA_PATH))


if __name__ == "__main__":
    sys.exit(main())
