"""Few-shot transfer of a small ResNet to rotated digits: linearized Laplace versus fine-tuning.

Source task: scikit-learn's 8×8 digits (first half of the 1797 images), upsampled to 1×32×32.
Target task: the other half, rotated by 40° and scaled by 0.85 (``F.affine_grid`` /
``F.grid_sample``; nothing downloaded); ``k`` labelled target images per class (k = 1, 5, 10)
are the training set, every other target image is a test point. The ten classes stay the same,
so the source head is kept.

Network: a ResNet-style CNN (conv stem, three stages of residual blocks with BatchNorm and
strided 3×3 convolutions, global average pooling, a linear head; about 7.8·10⁴ parameters),
trained on the source in float32. The linearized methods run on a float64 copy (the exact
``kernel`` route of :class:`pyro_ntk.LinearizedLaplace` solves with (N·C)² Grams, where float32
loses the evidence's gradients); BatchNorm is evaluated in eval mode.

Methods, per draw:

* **source net**: the source network, unadapted.
* **fine-tuning**: all weights, Adam (lr 1e-3, weight decay 1e-4, 100 full-batch steps, BatchNorm
  in eval mode), MAP predictions.
* **lin. Laplace**: :class:`pyro_ntk.LinearizedLaplace` over the NTK of the *whole* network,
  one prior variance per layer by the Laplace evidence (``optimize_prior``), extended probit.
* **tempered Laplace**: the same model with its posterior tempered, T chosen by 5-fold
  cross-validation on the k-shot set alone (:func:`pyro_ntk.cross_validate_temperature`); T = 1
  at k = 1.

Run: ``python examples/image_transfer.py [--quick] [--out-dir DIR] [--no-progress]``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pyro_ntk import LinearizedLaplace, cross_validate_temperature  # noqa: E402
from pyro_ntk.datasets import k_shot_split  # noqa: E402
from pyro_ntk.demo import classification_scores  # noqa: E402
from pyro_ntk.plot import reliability_diagram  # noqa: E402

METHODS = ("source net", "fine-tuning", "lin. Laplace", "tempered Laplace")
TEMPERATURES = tuple(4.0**-j for j in range(8))
ANGLE, SCALE, SIZE = 40.0, 0.85, 32


class Block(nn.Module):
    """A residual block: two 3×3 conv + BatchNorm, a strided 1×1 projection when shapes change."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))``."""
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


def make_resnet(widths=(16, 32, 64), classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(),
        Block(widths[0], widths[0], 1), Block(widths[0], widths[1], 2),
        Block(widths[1], widths[2], 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(widths[2], classes),
    )  # fmt: skip


def warp(X: torch.Tensor, angle: float, scale: float) -> torch.Tensor:
    """Rotate by ``angle`` degrees and scale by ``scale`` about the centre (bilinear)."""
    a = math.radians(angle)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])
    theta = (theta / scale).to(X.dtype).expand(len(X), 2, 3)
    grid = F.affine_grid(theta, list(X.shape), align_corners=False)
    return F.grid_sample(X, grid, align_corners=False)


def load_data():
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    X = F.interpolate(X, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(y)
    half = len(X) // 2
    return (X[:half], y[:half]), (warp(X[half:], ANGLE, SCALE), y[half:])


def train_source(X, y, epochs: int, progress: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = make_resnet().float()  # float32 training, whatever the default dtype
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="source ResNet (epochs)", disable=not progress, leave=False):
        net.train()
        for idx in torch.randperm(len(X), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def fine_tune(net: nn.Module, X, y, steps: int) -> nn.Module:
    net = copy.deepcopy(net).eval()  # BatchNorm statistics stay the source's
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(X), y).backward()
        opt.step()
    return net.eval()


def laplace(net64, X, y, steps: int, temperature: float = 1.0, variance=None):
    la = LinearizedLaplace(
        net64, "categorical", variance=1e-2 if variance is None else variance,
        layer_variances=True, method="kernel", temperature=temperature,
    )  # fmt: skip
    la.fit(X, y)
    if variance is None:
        la.optimize_prior(X, y, rounds=1, num_steps=steps)
    return la


def main(quick: bool = False, out_dir: str = "outputs", progress: bool = True, seeds=None,
         ks=None, epochs=None, test_points=None):  # fmt: skip
    """Run the comparison; returns ``{"table": {(k, method): (acc, nll, ece)}, "figure": path}``."""
    seeds = seeds or (1 if quick else 3)
    ks = ks or ((5,) if quick else (1, 5, 10))
    epochs = epochs or (2 if quick else 8)
    ft_steps, ev_steps = 100, 20
    os.makedirs(out_dir, exist_ok=True)
    (Xs, ys), (Xt, yt) = load_data()
    t0 = time.perf_counter()
    source = train_source(Xs, ys, epochs, progress)
    nparams = sum(p.numel() for p in source.parameters())
    print(f"source ResNet: {nparams} parameters, {time.perf_counter() - t0:.1f} s", flush=True)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    source64 = copy.deepcopy(source).double().eval()
    if test_points is not None:
        keep = torch.randperm(len(Xt), generator=torch.Generator().manual_seed(0))[:test_points]
        Xt, yt = Xt[keep], yt[keep]
    scores = {(k, m): [] for k in ks for m in METHODS}
    fig_probs = {}
    bar = tqdm(total=len(ks) * seeds, desc="k-shot draws", disable=not progress)
    for k in ks:
        for seed in range(seeds):
            tr, te = k_shot_split(yt, k, seed, num_classes=10)
            Xa, ya, Xe, ye = Xt[tr], yt[tr], Xt[te], yt[te]
            Xa64, Xe64 = Xa.double(), Xe.double()
            probs = {}
            tuned = fine_tune(source, Xa, ya, ft_steps)
            with torch.no_grad():
                probs["source net"] = torch.softmax(source(Xe), -1).double()
                probs["fine-tuning"] = torch.softmax(tuned(Xe), -1).double()
            la = laplace(source64, Xa64, ya, ev_steps)
            probs["lin. Laplace"] = la.predict(Xe64)
            T = 1.0
            if k >= 2:
                var = la.variance.detach()
                cv = cross_validate_temperature(
                    lambda X, y, var=var: laplace(source64, X, y, ev_steps, variance=var), Xa64, ya,
                    TEMPERATURES, folds=min(5, k),
                )  # fmt: skip
                T = cv.temperature
            # the same σ², refitted at T: the test inputs' cross kernels are reused
            la.temperature = T
            probs["tempered Laplace"] = la.fit(Xa64, ya).predict(Xe64)
            for m in METHODS:
                scores[k, m].append(classification_scores(probs[m], ye))
            if seed == 0:
                fig_probs[k] = {m: (probs[m], ye) for m in METHODS}
            line = ", ".join(
                f"{m} {scores[k, m][-1][0]:.3f}/{scores[k, m][-1][1]:.3f}" for m in METHODS
            )
            bar.write(f"k={k} seed={seed} T={T:.2g} (acc/NLL): {line}")
            bar.update()
    bar.close()
    assert all(torch.equal(v, state[k]) for k, v in source.state_dict().items())
    table = {key: tuple(sum(r[i] for r in rows) / len(rows) for i in range(3))
             for key, rows in scores.items()}  # fmt: skip
    lines = ["k   method              accuracy  NLL     ECE"]
    lines += [
        f"{k:<3} {m:<19} {a:.3f}     {n:.3f}   {e:.3f}" for (k, m), (a, n, e) in table.items()
    ]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, "image_transfer.txt"), "w") as f:
        f.write(text + "\n")
    kf = 5 if 5 in fig_probs else ks[0]
    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 4))
    for ax, m in zip(axes, METHODS):
        reliability_diagram(*fig_probs[kf][m], ax=ax, legend=False, title=m)
    fig.suptitle(f"Rotated digits, k = {kf} per class (seed 0)")
    fig.tight_layout()
    path = os.path.join(out_dir, "image_transfer_reliability.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {"table": table, "figure": path, "scores": scores}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", default="outputs")
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args()
    torch.set_num_threads(2)
    main(quick=a.quick, out_dir=a.out_dir, progress=not a.no_progress)
