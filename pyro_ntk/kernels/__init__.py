"""Kernels built on the empirical NTK: :class:`EmpiricalNTK` (Pyro) and :class:`NTKKernel` (GPyTorch)."""

from pyro_ntk.kernels.empirical_ntk import EmpiricalNTK as EmpiricalNTK
from pyro_ntk.kernels.ntk_kernel import NTKKernel as NTKKernel

__all__ = ["EmpiricalNTK", "NTKKernel"]
