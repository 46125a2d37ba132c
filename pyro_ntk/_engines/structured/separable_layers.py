"""Which layers take the channel-separable dense Gram: proven on the probe, re-tested per block.

:class:`SeparableLayers` is the structured engine's record of the channel-separable route
(:mod:`.separable`): the candidates found on the preflight's probe (cheaper by the flop
count, rank one per (example, channel), and agreeing with Jacobian contraction there), the
layers rejected, and per dense block which layers took the route, which fell back (a chunk
failing the rank-one test) and which shared one channel contraction
(:func:`~.separable.share_directions`). Every decision is written to the linearization's
report. Cost: the probe check is one separable Gram and one ``G Gᵀ`` per candidate on a
few examples; per block, the rank-one test of each candidate.

Example::

    book = SeparableLayers()
    book.prove(plan, factors_of_the_probe, report)   # finds book.candidates
    member = book.member(layer, i, f1, f2, scales, other_flops)  # None: general route
    book.gram([member, ...], K, symmetric=True)      # K += Σ K_l, shared where proven
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyro_ntk._engines.preflight import Report, agree, relative_error
from pyro_ntk._engines.preflight import tolerance as preflight_tolerance
from pyro_ntk._engines.structured.factors import Factors
from pyro_ntk._engines.structured.plan import Layer, Plan
from pyro_ntk._engines.structured.separable import (
    Member,
    channel_gram,
    separable_flops,
    separable_gram,
    separate,
    share_directions,
    tolerance,
)


def _width(layer: Layer) -> int:
    return layer.d_in * (layer.weight is not None) + (layer.bias is not None)


@dataclass
class SeparableLayers:
    """Which layers take the separable Gram, and what happened on the batches.

    ``candidates``: layers whose chunk passed the rank-one test on the probe and whose
    separable Gram agreed with Jacobian contraction there (:meth:`prove`); every dense
    block re-tests them on its own two chunks (:meth:`member`). ``rejected``: layers the
    separable Gram would make cheaper that failed the test on the probe, with their
    residual (they take the general route, as before any test). ``taken``: per layer, the
    blocks that took the separable Gram; ``fallbacks``: per layer, the blocks whose
    chunks failed the test (they took the general route) and the largest residual seen.
    ``shared``: per layer, the layer whose contraction it joined in the last dense block
    (:func:`share_directions`); ``share``: whether joining is allowed (it is switched off
    when the joined Gram disagrees with Jacobian contraction on the probe).
    """

    candidates: set[str] = field(default_factory=set)
    rejected: dict[str, float] = field(default_factory=dict)
    taken: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, tuple[int, float]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    share: bool = True
    report: Report | None = field(default=None, repr=False)

    def prove(self, plan: Plan, fac: Factors, report: Report) -> None:
        """Find the candidates on the probe's factors ``fac`` and record them in ``report``.

        A layer is a candidate when the separable Gram costs fewer multiply-adds than
        Jacobian contraction, its probe chunk passes the rank-one test, and its separable
        Gram agrees with ``G Gᵀ`` there (preflight tolerance); a layer that passes the
        test but disagrees is reported as a fallback and not used. Then the candidates'
        shared contractions (:func:`share_directions`) are checked the same way against
        the sum of their ``G Gᵀ``; on disagreement every layer keeps its own.
        """
        self.report = report
        grams: dict[str, Tensor] = {}
        members: list[Member] = []
        for i, layer in enumerate(plan.layers):
            s = separate(layer, fac, i)
            if s is None:
                continue
            n, O, C = s.a.shape
            P_l = layer.d_out * _width(layer)
            tol = tolerance(s.a.dtype)
            if separable_flops(C, _width(layer), O) >= O * O * P_l:
                continue
            if s.residual > tol:
                self.rejected[layer.module_name] = s.residual
                continue
            parts = []
            if layer.weight is not None:
                parts.append(fac.wgrad(i).reshape(n * O, -1))
            if layer.bias is not None:
                parts.append(fac.bsum(i).reshape(n * O, -1))
            G = torch.cat(parts, dim=1)
            want, got = G @ G.T, separable_gram(s, s, 1.0, 1.0, symmetric=False)
            subject = _subject(layer)
            if not agree(got, want, preflight_tolerance(s.a.dtype)):
                report.add(
                    subject,
                    "fallback",
                    f"dense K: the separable Gram is off by {relative_error(got, want):.2g} "
                    "from Jacobian contraction on the probe → the general route",
                )
                self.candidates.discard(layer.module_name)
                continue
            self.candidates.add(layer.module_name)
            grams[layer.module_name] = want
            members.append(Member(s, s, 1.0, 1.0, layer.module_name))
            report.add(
                subject,
                "fast path",
                "dense K channel-separable: ∂f/∂z rank one per (example, channel) on the "
                f"probe (relative residual ≤ {tol:.1g}), agrees with Jacobian contraction; "
                "re-tested on the chunks of every dense block",
            )
        self._prove_sharing(members, grams, report)

    def _prove_sharing(self, members: list[Member], grams: dict, report: Report) -> None:
        """Check each shared contraction of the probe against its layers' ``Σ G Gᵀ``."""
        for group in share_directions(members, symmetric=True):
            if len(group) == 1:
                continue
            n, O, _ = group[0].s1.a.shape
            got = group[0].s1.a.new_zeros(n, O, n, O)
            channel_gram(group, got, symmetric=False)
            got = got.reshape(n * O, n * O)
            want = sum(grams[m.name] for m in group)
            names = ", ".join(m.name for m in group)
            if not agree(got, want, preflight_tolerance(got.dtype)):
                self.share = False
                report.add(
                    names,
                    "fallback",
                    f"dense K: the shared channel contraction is off by "
                    f"{relative_error(got, want):.2g} from Jacobian contraction on the probe "
                    "→ one contraction per layer",
                )
                return
            report.add(
                names,
                "fast path",
                "dense K: sensitivity directions shared per (example, channel) on the probe → "
                "one channel contraction, agrees with Jacobian contraction; re-tested on the "
                "chunks of every dense block",
            )

    def member(
        self, layer: Layer, i: int, f1: Factors, f2: Factors, scales: tuple, other_flops: float
    ) -> Member | None:
        """Layer ``i``'s separable forms on the two chunks, or ``None``: the general route.

        ``None`` when the layer is no candidate, when its general route (``other_flops``
        multiply-adds per example pair) is cheaper, or when either chunk fails the
        rank-one test (counted in ``fallbacks`` and reported).
        """
        if layer.module_name not in self.candidates:
            return None
        s1 = separate(layer, f1, i)
        if s1 is None:
            return None
        O, C = s1.a.shape[1:]
        if separable_flops(C, _width(layer), O) >= other_flops:
            return None
        same = f2 is f1
        s2 = s1 if same else separate(layer, f2, i)
        if s2 is None:
            return None
        tol = tolerance(s1.a.dtype)
        residual = max(s1.residual, s2.residual)
        if residual > tol:
            self.failed(layer, residual, tol)
            return None
        self.taken[layer.module_name] = self.taken.get(layer.module_name, 0) + 1
        return Member(s1, s2, scales[0], scales[1], layer.module_name)

    def gram(self, members: list[Member], out: Tensor, symmetric: bool) -> None:
        """``out += Σ K_l`` over ``members`` (``out (n1·O, n2·O)``), shared where proven.

        Groups by :func:`share_directions` (when :attr:`share`), one :func:`channel_gram`
        per group; ``symmetric``: the upper triangle only, as :class:`~.gram.GramSum` wants.
        """
        if not members:
            return
        n1, O, _ = members[0].s1.a.shape
        view = out.view(n1, O, -1, O)
        groups = share_directions(members, symmetric) if self.share else [[m] for m in members]
        for group in groups:
            for m in group[1:]:
                self.shared[m.name] = group[0].name
            channel_gram(group, view, symmetric)

    def failed(self, layer: Layer, residual: float, tol: float) -> None:
        """Count and report one block of ``layer`` whose chunks failed the rank-one test."""
        count, worst = self.fallbacks.get(layer.module_name, (0, 0.0))
        self.fallbacks[layer.module_name] = (count + 1, max(worst, residual))
        if self.report is not None:
            self.report.add(
                _subject(layer),
                "fallback",
                "dense K: ∂f/∂z not rank one per (example, channel) on a batch (relative "
                f"residual over {tol:.1g}) → the general route for its blocks",
            )


def _subject(layer: Layer) -> str:
    return f"{layer.module_name} ({type(layer.module).__name__})"
