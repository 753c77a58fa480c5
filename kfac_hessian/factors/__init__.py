"""The factors stage: ``compute_kfac`` (the driver) streams the data once through the model, the layer kinds'
accumulators (``kfac_hessian.layers``) gather their sums, and ``KFAC`` holds the resulting blocks."""

from .driver import compute_kfac, input_second_moments
from .ekfac import compute_ekfac
from .kronecker_fit import compute_kronecker_fit
from .result import KFAC

__all__ = ["KFAC", "compute_ekfac", "compute_kfac", "compute_kronecker_fit", "input_second_moments"]
