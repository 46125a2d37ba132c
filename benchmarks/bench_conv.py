"""Convolution benchmark: structured conv products on a ResNet-style CNN and at ResNet-18 shape.

Everything in one process, timed round-robin (min of ``--repeats``, :mod:`_common`), float32,
``torch.set_num_threads(2)`` on CPU; times are ratios to one forward+backward pass
(``net(X).sum().backward()``) over the same N, measured in the same rounds.

1. **ResNet-style CNN** (``bench_engine.resnet_small``: BasicBlocks with BatchNorm in eval
   mode, residual adds, a strided grouped conv, global pooling; 3×32×32 → 10) at N = 512:
   per engine (``functorch``, ``cached``, ``structured``, and what ``auto`` picks) one K·v,
   16 right-hand sides and the first call (building the caches); plain ``torch.func``
   vjp+jvp; the dense K (at ``--n-dense``) against ``torch.func`` Jacobian contraction
   (``vmap(jacrev)`` + ``einsum``), beside the structured engine's general route alone
   (its channel-separable Gram off: :mod:`pyro_ntk._engines.structured.separable`) and the
   largest difference between the two. Once with every parameter (BatchNorm's affine
   parameters factored as per-channel diagonal layers) and once with the conv/linear
   weights only.
2. **Dense-K route rule**: per conv layer, the patch Gram and the Jacobian contraction
   (:mod:`pyro_ntk._engines.structured.gram`) timed against each other at ``--n-dense``,
   beside the route the flop rule picks.
3. **ResNet-18 shape** (CIFAR stem, [2, 2, 2, 2] BasicBlocks, 11.2 M parameters) at small N
   (``--n18``): one K·v per engine, the first call, and the factors' size against the
   ``N·O·P`` Jacobian that no path forms.
4. **Lazy factors** (``--sections lazy``, ResNet-style CNN at ``--n``): the structured
   engine's first K·v after ``clear_cache`` (streaming ``torch.func`` vjp/jvp), its second
   (the vjp that builds the factors) and the steady K·v, side by side with the eager engine
   (``build_after = 0``: the first K·v builds), ``auto`` and plain ``torch.func`` vjp+jvp;
   the total cost of ``k`` products (lazy, eager, streaming only) and the break-even.
5. **Peak memory** of one K·v (first call: caches included) per engine against
   forward+backward, at ``--n`` (ResNet-style) and ``--n18-memory`` (ResNet-18 shape): a
   fresh subprocess per entry; the network, inputs and the preflight (on 4 rows) come
   first, then the peak is reset and the product's peak RSS over the RSS before it is
   taken (``VmHWM``); CUDA ``max_memory_allocated`` on GPU. The setup's own peak (the
   preflight at ResNet-18 shape holds a few ``P``-vectors) is reported apart.

Usage: ``python benchmarks/bench_conv.py [--quick] [--repeats R] [--device cuda] [--write]``
(``--write`` replaces the "Convolutions" section of RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import interleaved_min, machine, markdown_table, peak_rss_subprocess, write_section
from bench_engine import forward_backward, jacobian_contraction, resnet_small, torch_func_mvm

import pyro_ntk._engines.structured.factors as factors_mod
from pyro_ntk import Linearization
from pyro_ntk._engines.structured.factors import build_factors, weight_grads
from pyro_ntk._engines.structured.gram import (
    choose_route,
    contraction_flops,
    patch_gram,
    patch_gram_flops,
)

ENGINES = ("functorch", "cached", "structured")


# ---------------------------------------------------------------------------- networks
class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock (projection shortcut on a stride or width change)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        """relu(bn2(conv2(relu(bn1(conv1(x))))) + down(x))."""
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.down(x))


def resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 3×32×32 inputs (3×3 stem, no max-pool): 11,173,962 parameters."""
    layers, c = [], 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c, width, stride), BasicBlock(width, width)]
        c = width
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, 1, 1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


def factored_weights(net: nn.Module) -> list[str]:
    """The parameters of the conv/linear layers (BatchNorm's affine parameters frozen)."""
    return [
        f"{m_name}.{p_name}" if m_name else p_name
        for m_name, m in net.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))
        for p_name, _ in m.named_parameters(recurse=False)
    ]


BUILDERS = {"resnet_small": resnet_small, "resnet18": resnet18}


def build(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    net = BUILDERS[name]().to(device).eval()
    with torch.no_grad():  # non-trivial running statistics, as after training
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    def run():
        out = fn()
        sync(device)
        return out

    return run


def measure(fns: dict, repeats: int, device: str) -> dict:
    """``interleaved_min`` after one warm-up call of each, whose time is printed (progress)."""
    fns = {k: timed(f, device) for k, f in fns.items()}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        print(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    return interleaved_min(fns, repeats, warmup=0)


# ---------------------------------------------------------------------------- timings
GENERAL = "structured, general route only (no channel-separable Gram), dense K"


def products_table(
    net, X, X_dense, params, repeats, device, dense: bool, engines=ENGINES
) -> tuple[str, dict]:
    """K·v, 16 RHS, first call, dense K per engine; ratios to forward+backward."""
    N = X.shape[0]
    O = net(X[:1]).numel()
    lins = {e: Linearization(net, params, implementation=e) for e in (*engines, "auto")}
    picked = lins["auto"].implementation.value
    fns = {"forward+backward": forward_backward(net, X)}
    V1, V16 = torch.randn(N * O, 1, device=device), torch.randn(N * O, 16, device=device)
    for e, lin in lins.items():
        t0 = time.perf_counter()
        lin(X)  # preflight on this input signature
        print(f"  preflight {e}: {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
        for k, V in ((1, V1), (16, V16)):
            fns[f"{e}, K·v k={k}"] = lambda lin=lin, V=V: lin.ntk_mvm(X, X, V)
        if lin.engine.caches_closures or e == "auto":
            # its own linearization: clearing the timed one's cache would put the (lazy)
            # build into its steady K·v rows of the round-robin
            fresh = Linearization(net, params, implementation=e)
            fresh(X)

            def first(lin=fresh):
                lin.clear_cache()
                lin.ntk_mvm(X, X, V1)

            fns[f"{e}, first call (after clear_cache)"] = first
    if params is None:
        fns["torch.func vjp+jvp, k=1"] = torch_func_mvm(net, X, V1)
        fns["torch.func vjp+jvp, k=16"] = torch_func_mvm(net, X, V16)
    best = measure(fns, repeats, device)
    fb = best["forward+backward"]
    rows = [[k, f"{t * 1e3:.1f}", f"{t / fb:.2f}"] for k, t in best.items()]
    fig = {k: t / fb for k, t in best.items()}
    fig["auto picks"] = picked
    if dense:
        nd = X_dense.shape[0]
        dfns = {f"forward+backward, N={nd}": forward_backward(net, X_dense)}
        for e, lin in lins.items():
            lin(X_dense)
            dfns[f"{e}, dense K"] = lambda lin=lin: lin.ntk_dense(X_dense)
        general = GENERAL
        if "structured" in lins:  # the same engine without its channel-separable Gram
            plain = Linearization(net, params, implementation="structured")
            plain.ntk_dense(X_dense[:2])  # proves the dense routes (finds separable layers)
            plain.engine.separable.candidates.clear()
            dfns[general] = lambda: plain.ntk_dense(X_dense)
            diff = (lins["structured"].ntk_dense(X_dense) - plain.ntk_dense(X_dense)).abs()
            fig["separable vs general route, max abs diff"] = float(diff.max())
            fig["separable layers"] = sorted(lins["structured"].engine.separable.candidates)
        if params is None:
            dfns["torch.func Jacobian contraction"] = jacobian_contraction(net, X_dense)
        dbest = measure(dfns, repeats, device)
        fbd = dbest[f"forward+backward, N={nd}"]
        rows += [[k, f"{t * 1e3:.1f}", f"{t / fbd:.1f}"] for k, t in dbest.items()]
        fig.update({k: t / fbd for k, t in dbest.items()})
        if params is None:
            jc = dbest["torch.func Jacobian contraction"]
            keys = [f"{e}, dense K" for e in lins] + [general] * (general in dbest)
            fig["dense speedup"] = {k: jc / dbest[k] for k in keys}
            print(f"  dense K, × faster than torch.func JC: {fig['dense speedup']}", flush=True)
        if "separable vs general route, max abs diff" in fig:
            print(
                f"  separable layers {fig['separable layers']}; dense K against the general "
                f"route: max abs diff {fig['separable vs general route, max abs diff']:.3g}",
                flush=True,
            )
    table = markdown_table([f"N={N}, O={O}", "ms", "× fwd+bwd"], rows)
    return table, fig


def route_table(net, X, repeats, device) -> str:
    """Per conv layer: the patch Gram against the Jacobian contraction, and the rule's pick."""
    lin = Linearization(net, implementation="structured")
    lin(X)
    engine = lin.engine
    keep = factors_mod.prefer_gradients
    factors_mod.prefer_gradients = lambda *a: False  # hold A and B for every layer
    try:
        fac, _ = build_factors(
            engine.plan, engine.f, engine.space.theta, engine.routes, engine.network, X
        )
    finally:
        factors_mod.prefer_gradients = keep
    n = X.shape[0]
    rows = []
    for i, layer in enumerate(engine.plan.layers):
        A, B = fac.A[i], fac.B[i]
        if not layer.spatial_dims or layer.weight is None:  # convolutions only
            continue
        _, O, S, d_out = B.shape
        P_W = layer.d_out * layer.d_in

        def patch(A=A, B=B, g=layer.groups):
            return patch_gram(A, B, A, B, g)

        def contraction(A=A, B=B, g=layer.groups, rows=n * O):
            G = weight_grads(A, B, g).reshape(rows, -1)
            return G @ G.T

        fp = patch_gram_flops(S, layer.in_width, d_out, O, layer.groups)
        fc = contraction_flops(S, P_W, O, n, n, False)
        fns = {"patch": patch, "jc": contraction} if fp < 20 * fc else {"jc": contraction}
        t = {"patch": float("nan"), **measure(fns, repeats, device)}  # nan: > 20× the flops
        rule = choose_route(layer, S, O, n, n)
        faster = "patch" if t["patch"] < t["jc"] else "contraction"
        rows.append(
            [
                layer.module_name,
                f"S={S}, G·d_in={layer.in_width}, d_out={d_out}, G={layer.groups}",
                f"{patch_gram_flops(S, layer.in_width, d_out, O, layer.groups) / 1e3:.0f}k",
                f"{contraction_flops(S, P_W, O, n, n, False) / 1e3:.0f}k",
                f"{t['patch'] * 1e3:.1f}",
                f"{t['jc'] * 1e3:.1f}",
                rule,
                faster,
            ]
        )
    headers = [
        f"layer (N={n})",
        "shape",
        "patch flops/pair",
        "contraction flops/pair",
        "patch ms",
        "contraction ms",
        "rule picks",
        "faster",
    ]
    return markdown_table(headers, rows)


# ---------------------------------------------------------------------------- memory
MEMORY_CODE = """
import gc, sys, torch
sys.path.insert(0, {bench!r})
from bench_conv import build, forward_backward, torch_func_mvm
from pyro_ntk import Linearization
device = {device!r}
net = build({net!r}, device)
X = torch.randn({n}, 3, 32, 32, device=device)
V = torch.randn({n} * 10, 1, device=device)
what, calls = {what!r}, {calls}
if what != 'forward+backward' and what != 'torch.func vjp+jvp':
    lin = Linearization(net, implementation=what)
    lin(X[:4])  # preflight on a small batch: the peak below is the product's
if what == 'torch.func vjp+jvp':
    run = torch_func_mvm(net, X, V)
gc.collect()
setup_peak, before = _status('VmHWM'), _status('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')  # the peak from here on is the product's
if device == 'cuda':
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated() if device == 'cuda' else 0
for _ in range(calls):
    if what == 'forward+backward':
        forward_backward(net, X)()
    elif what == 'torch.func vjp+jvp':
        run()
    else:
        lin.ntk_mvm(X, X, V)
cache = getattr(getattr(lin, 'engine', None), 'cache', None) if what in ('cached', 'structured', 'auto') else None
RESULT = dict(
    cuda_peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20 if device == 'cuda' else None,
    product_mib=(_status('VmHWM') - before) / 1024,
    setup_mib=(setup_peak - _base) / 1024,
    builds=None if cache is None else cache.builds,
    held_mib=None if cache is None else cache.nbytes / 2**20,
)
"""


def memory_table(net_name: str, n: int, device: str, whats) -> tuple[str, dict]:
    """Peak memory of K·v per engine (from a fresh process) against forward+backward.

    ``whats``: ``(label, what, calls)``; ``calls`` products in a row (2: the second K·v,
    where a lazy engine builds the factors when they fit in its cache budget).
    """
    bench = str(Path(__file__).resolve().parent)
    res, rows = {}, []
    for label, what, calls in whats:
        code = MEMORY_CODE.format(
            bench=bench, device=device, net=net_name, n=n, what=what, calls=calls
        )
        t0 = time.perf_counter()
        r = peak_rss_subprocess(code)
        print(
            f"  memory {net_name} {label}: {time.perf_counter() - t0:.0f} s, {r}",
            file=sys.stderr,
            flush=True,
        )
        res[label] = r
    fb = res["forward+backward"]["cuda_peak_mib" if device == "cuda" else "product_mib"]
    for label, r in res.items():
        m = r["cuda_peak_mib"] if device == "cuda" else r["product_mib"]
        built = "" if r["builds"] is None else f"{r['builds']} / {r['held_mib']:.0f} MiB"
        rows.append([label, f"{m:.0f}", f"{m / fb:.2f}", f"{r['setup_mib']:.0f}", built])
    unit = "CUDA max_memory_allocated MiB" if device == "cuda" else "peak RSS over before, MiB"
    headers = [f"{net_name}, N={n}", unit, "× fwd+bwd", "setup peak, MiB", "builds / held"]
    return markdown_table(headers, rows), res


def memory_whats(engines) -> list[tuple[str, str, int]]:
    whats = [("forward+backward", "forward+backward", 1)]
    for e in engines:
        whats.append((f"{e}, one K·v", e, 1))
        if e in ("structured", "auto"):
            whats.append((f"{e}, two K·v", e, 2))
    return [*whats, ("torch.func vjp+jvp, one K·v", "torch.func vjp+jvp", 1)]


# ---------------------------------------------------------------------------- lazy
def lazy_table(net, X, params, repeats: int, device: str, with_auto: bool) -> tuple[str, dict]:
    """First, second and steady K·v after ``clear_cache``: lazy, eager, auto, torch.func."""
    N = X.shape[0]
    O = net(X[:1]).numel()
    V = torch.randn(N * O, 1, device=device)
    lins = {
        "structured (lazy)": Linearization(net, params, implementation="structured"),
        "structured (eager, build_after=0)": Linearization(
            net, params, implementation="structured"
        ),
    }
    if with_auto:
        lins["auto"] = Linearization(net, params)
    lins["structured (eager, build_after=0)"].engine.build_after = 0
    for lin in lins.values():
        lin(X)
    fb = timed(forward_backward(net, X), device)
    plain = timed(torch_func_mvm(net, X, V), device) if params is None else None
    best: dict[str, float] = {}

    def keep(name: str, t: float) -> None:
        best[name] = min(best.get(name, float("inf")), t)

    for r in range(repeats + 1):  # round 0 warms up, untimed
        t0 = time.perf_counter()
        fb()
        t_fb = time.perf_counter() - t0
        times = {}
        for e, lin in lins.items():
            lin.clear_cache()
            for call in ("first", "second", "steady"):
                t0 = time.perf_counter()
                lin.ntk_mvm(X, X, V)
                sync(device)
                times[f"{e}, {call}"] = time.perf_counter() - t0
        if plain is not None:
            t0 = time.perf_counter()
            plain()
            times["torch.func vjp+jvp"] = time.perf_counter() - t0
        print(
            f"  lazy round {r}: " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()),
            file=sys.stderr,
            flush=True,
        )
        if r:
            keep("forward+backward", t_fb)
            for k, v in times.items():
                keep(k, v)
    f = best["forward+backward"]
    rows = [[k, f"{t * 1e3:.1f}", f"{t / f:.2f}"] for k, t in best.items()]
    fig = {k: t / f for k, t in best.items()}
    table = markdown_table([f"N={N}, O={O}, K·v after clear_cache", "ms", "× fwd+bwd"], rows)
    lazy = [fig[f"structured (lazy), {c}"] for c in ("first", "second", "steady")]
    eager = [fig[f"structured (eager, build_after=0), {c}"] for c in ("first", "second", "steady")]
    steady = min(lazy[2], eager[2])  # the same factored K·v in both: the less noisy figure

    def total_lazy(k):
        return lazy[0] if k == 1 else lazy[0] + lazy[1] + (k - 2) * steady

    def total_eager(k):
        return eager[0] + (k - 1) * steady

    cost_rows = [
        [k, f"{total_lazy(k):.1f}", f"{total_eager(k):.1f}", f"{k * lazy[0]:.1f}"]
        for k in (1, 2, 3, 5, 10, 30, 100)
    ]
    even = next((k for k in range(2, 10_000) if total_lazy(k) <= k * lazy[0]), None)
    fig["break-even vs streaming"] = even
    cost = markdown_table(
        ["k products on a chunk", "lazy (× fwd+bwd)", "eager", "streaming only"], cost_rows
    )
    note = (
        f"Totals from the minima above (steady K·v {steady:.2f}× for both). The lazy build "
        f"pays off against streaming every product from the {even}-th K·v on a chunk; "
        f"against eager, lazy saves {total_eager(1) - total_lazy(1):.1f}× when one K·v is "
        f"all, and costs {total_lazy(2) - total_eager(2):.1f}× more for two or more (its "
        "streamed first K·v, less the build's difference between the two runs)."
    )
    return f"{table}\n\n{cost}\n\n{note}", fig


# ---------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 128, N_dense = 32, N18 = 8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n", type=int, default=512, help="N of the ResNet-style K·v")
    parser.add_argument("--n-dense", type=int, default=128, help="N of the dense K")
    parser.add_argument("--n18", type=int, default=32, help="N at ResNet-18 shape")
    parser.add_argument(
        "--n18-memory", type=int, default=1024, help="N of the ResNet-18 peak-memory runs"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated engines to time (auto is always timed in the products tables; "
        "in the lazy and memory sections only when listed)",
    )
    parser.add_argument(
        "--sections",
        default="small,routes,resnet18,lazy,memory",
        help="comma-separated parts to run: small (ResNet-style products), routes, "
        "resnet18, lazy, memory",
    )
    parser.add_argument(
        "--memory-nets", default="resnet_small,resnet18", help="networks of the memory section"
    )
    parser.add_argument("--write", action="store_true", help="replace RESULTS.md's section")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.n_dense, args.n18, args.n18_memory = 128, 32, 8, 8
    engines = tuple(e for e in args.engines.split(",") if e)
    sections = set(args.sections.split(","))
    torch.set_num_threads(args.threads)
    dev = args.device
    out = [
        f"Machine: {machine()}. Command: `python benchmarks/bench_conv.py "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}`."
    ]
    figures = {}
    t0 = time.perf_counter()

    net = build("resnet_small", dev)
    P = sum(p.numel() for p in net.parameters())
    X = torch.randn(args.n, 3, 32, 32, device=dev)
    Xd = X[: args.n_dense]
    for label, params in (("every parameter", None), ("conv/linear only", factored_weights(net))):
        if "small" not in sections:
            break
        table, fig = products_table(net, X, Xd, params, args.repeats, dev, True, engines)
        figures[f"resnet_small, {label}"] = fig
        out.append(
            f"### ResNet-style CNN (P={P}), {label}; auto picks {fig['auto picks']!r}\n\n{table}"
        )
        print(out[-1], flush=True)
    if "routes" in sections:
        routes = route_table(net, Xd, args.repeats, dev)
        out.append(f"### Dense-K routes per conv layer\n\n{routes}")
        print(out[-1], flush=True)
    if "resnet18" in sections:
        resnet18_section(args, dev, engines, out, figures)
    if "lazy" in sections:
        for label, params in (
            ("every parameter", None),
            ("conv/linear only", factored_weights(net)),
        ):
            table, fig = lazy_table(net, X, params, args.repeats, dev, "auto" in engines)
            figures[f"lazy resnet_small, {label}"] = fig
            out.append(f"### Lazy factors, ResNet-style CNN, {label}\n\n{table}")
            print(out[-1], flush=True)
    if "memory" in sections and not args.skip_memory:
        for name, n in (("resnet_small", args.n), ("resnet18", args.n18_memory)):
            if name not in args.memory_nets.split(","):
                continue
            table, res = memory_table(name, n, dev, memory_whats(engines))
            figures[f"memory {name}"] = res
            out.append(f"### Peak memory, {name}\n\n{table}")
            print(out[-1], flush=True)
    out.append(f"Total run time {time.perf_counter() - t0:.0f} s.")
    body = "\n\n".join(out)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    if args.write:
        write_section("Convolutions", body)


def resnet18_section(args, dev: str, engines: tuple, out: list, figures: dict) -> None:
    """Products at ResNet-18 shape, and the size of the structured cache."""
    net18 = build("resnet18", dev)
    P18 = sum(p.numel() for p in net18.parameters())
    X18 = torch.randn(args.n18, 3, 32, 32, device=dev)
    reps = max(1, args.repeats - 1)
    table, fig = products_table(net18, X18, None, None, reps, dev, False, engines)
    lin = Linearization(net18, implementation="structured")
    for _ in range(2):  # the second K·v builds the factors (when they fit in the budget)
        lin.ntk_mvm(X18, X18, torch.randn(args.n18 * 10, 1, device=dev))
    held = lin.engine.cache.nbytes
    jac = args.n18 * 10 * P18 * 4
    note = (
        f"Structured factors held: {held / 2**20:.0f} MiB; the N·O·P Jacobian would be "
        f"{jac / 2**20:.0f} MiB."
    )
    figures["resnet18"] = fig
    out.append(f"### ResNet-18 shape (P={P18}), N={args.n18}\n\n{table}\n\n{note}")
    print(out[-1], flush=True)


if __name__ == "__main__":
    main()
