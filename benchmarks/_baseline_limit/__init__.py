"""A frozen copy of the limit's kernels and solves as of commit 636efd8 (before issue 13), kept runnable so that
``benchmarks/limit_kernels.py`` can time today's code against it side by side. Do not edit: it is the baseline."""

from .adjoint import adjoint_field, grad_map
from .attention import velocity

__all__ = ["velocity", "adjoint_field", "grad_map"]
