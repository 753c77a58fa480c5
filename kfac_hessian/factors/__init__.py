"""The factors stage: ``compute_kfac`` (``driver``) streams the data once through the model (``stream``), the layer
kinds' accumulators (``kfac_hessian.layers``) gather their sums, and ``KFAC`` (``result``) holds the blocks;
``compute_ekfac`` and ``compute_kronecker_fit`` add one per-sample pass (``per_sample``). ``PassOptions``
(``options``) declares how every pass runs; ``plan`` (``plan``) says what a pass will cost before it runs, and
``compute_kfac`` refuses a pass over its budget (``PlanExceedsBudget``)."""

from .driver import compute_kfac
from .ekfac import compute_ekfac
from .kronecker_fit import compute_kronecker_fit
from .options import PassOptions
from .plan import FactorPlan, Plan, PlanExceedsBudget, plan
from .result import KFAC

__all__ = ["KFAC", "FactorPlan", "PassOptions", "Plan", "PlanExceedsBudget", "compute_ekfac", "compute_kfac",
           "compute_kronecker_fit", "plan"]
