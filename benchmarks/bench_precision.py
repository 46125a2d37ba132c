"""float32 against float64: accuracy of NTK products, GP posterior means, and jitter needed.

Trains a small tanh MLP (1-32-32-1, float64) on a noisy sine, then compares float32
results with the float64 reference on the same weights:

* ``ntk_mvm``: relative error ‖K₃₂V − K₆₄V‖ / ‖K₆₄V‖ (4 right-hand sides);
* the :class:`pyro_ntk.NTKGPRegression` posterior mean at 100 test inputs, Cholesky path,
  for several noise levels (relative error in the ∞-norm against float64);
* the jitter :func:`pyro_ntk.solvers.cholesky_with_jitter` needs on the noise-free K.

Run: ``.venv/bin/python benchmarks/bench_precision.py`` (about a minute on one CPU core).
"""

from __future__ import annotations

import copy
import re
import warnings

import pyro
import torch
from torch import nn

from pyro_ntk import Linearization, NTKGPRegression
from pyro_ntk.options import SolverOptions
from pyro_ntk.solvers import cholesky_with_jitter


def train(N: int = 200, seed: int = 0):
    torch.manual_seed(seed)
    X = torch.linspace(-3, 3, N, dtype=torch.float64).unsqueeze(-1)
    y = torch.sin(2 * X).squeeze(-1) + 0.1 * torch.randn(N, dtype=torch.float64)
    net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    net = net.double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        ((net(X).squeeze(-1) - y) ** 2).mean().backward()
        opt.step()
    return net, X, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def jitter_needed(K: torch.Tensor) -> str:
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            cholesky_with_jitter(K)
        except ValueError:
            return "fails (cap reached)"
    if not w:
        return "none"
    m = re.search(r"jitter ([0-9.e+-]+) added .*\(([0-9.e+-]+) × mean", str(w[0].message))
    return f"{float(m.group(1)):.1e} ({float(m.group(2)):.0e} × mean diag)"


def main() -> None:
    net64, X64, y64 = train()
    net32 = copy.deepcopy(net64).float()
    X32, y32 = X64.float(), y64.float()
    Xs64 = torch.linspace(-4, 4, 100, dtype=torch.float64).unsqueeze(-1)
    Xs32 = Xs64.float()
    lin64, lin32 = Linearization(net64), Linearization(net32)
    print(f"network 1-32-32-1 tanh, P = {lin64.num_params}, N = {X64.shape[0]}")

    V64 = torch.randn(X64.shape[0], 4, dtype=torch.float64)
    mvm = rel(lin32.ntk_mvm(X32, None, V64.float()), lin64.ntk_mvm(X64, None, V64))
    K64 = lin64.ntk_dense(X64)
    K32 = lin32.ntk_dense(X32)
    eig = torch.linalg.eigvalsh(K64)
    print(f"ntk_mvm relative error float32 vs float64: {mvm:.1e}")
    print(f"ntk_dense relative error float32 vs float64: {rel(K32, K64):.1e}")
    print(f"K: largest eigenvalue {float(eig[-1]):.2e}, rank <= P = {lin64.num_params}")
    print(f"jitter needed, noise-free K, float64: {jitter_needed(K64)}")
    print(f"jitter needed, noise-free K, float32: {jitter_needed(K32)}")

    for noise in (1e-1, 1e-2, 1e-3, 1e-4):
        means = {}
        for dtype, net, X, y, Xs in (
            ("float64", net64, X64, y64, Xs64),
            ("float32", net32, X32, y32, Xs32),
        ):
            pyro.clear_param_store()  # PyroParams are keyed by name in the global store
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                gp = NTKGPRegression(
                    X,
                    y,
                    net,
                    noise=torch.tensor(noise, dtype=X.dtype),
                    options=SolverOptions(solver="cholesky"),
                )
                with torch.no_grad():
                    means[dtype] = (gp(Xs)[0], len(w))
        m64, m32 = means["float64"][0], means["float32"][0]
        err = float((m32.double() - m64).abs().max() / m64.abs().max())
        print(
            f"posterior mean, noise {noise:.0e}: relative error float32 vs float64 {err:.1e} "
            f"(warnings: float64 {means['float64'][1]}, float32 {means['float32'][1]})"
        )


if __name__ == "__main__":
    main()
