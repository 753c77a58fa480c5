"""The factors stage: ``compute_kfac`` (``driver``) streams the data once through the model (``stream``), the layer
kinds' accumulators (``kfac_hessian.layers``) gather their sums, and ``KFAC`` (``result``) holds the blocks;
``compute_ekfac`` and ``compute_kronecker_fit`` add one per-sample pass (``per_sample``). ``PassOptions``
(``options``) declares how every pass runs."""

from .driver import compute_kfac
from .ekfac import compute_ekfac
from .kronecker_fit import compute_kronecker_fit
from .options import PassOptions
from .result import KFAC

__all__ = ["KFAC", "PassOptions", "compute_ekfac", "compute_kfac", "compute_kronecker_fit"]
