"""What a federated client shares, saved as hybrid.py reads it: the weights of its model
(w.pt, a state_dict) and the gradient of one private image (g.pt, by parameter name). Here the
model is examples/lenet.py's LeNet, its weights drawn uniform(-0.5, 0.5) as DLG draws them, and
the image MNIST's test image 0 (offline: from foolbox's wheel). Then

    python hybrid.py --model examples/lenet.py:LeNet --weights w.pt --gradient g.pt --input-shape 1 28 28

Usage: python examples/capture.py [FOLDER]   (default: the current folder)"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from lenet import LeNet  # noqa: E402
from leakage.data import load_test_split  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    torch.manual_seed(0)
    model = LeNet()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5)
    (image,), _ = load_test_split("mnist-test", [0], "data", download=False)  # pixels - 0.5, as hybrid.py's
    loss = F.cross_entropy(model(image.x), torch.tensor([image.label]))  # one image, as a client computes it
    loss.backward()
    torch.save(model.state_dict(), out / "w.pt")
    torch.save({n: p.grad for n, p in model.named_parameters()}, out / "g.pt")
    print(f"wrote {out / 'w.pt'} and {out / 'g.pt'}: MNIST test image 0, label {image.label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
