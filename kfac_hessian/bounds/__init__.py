"""Generalization bounds: PAC-Bayes with the posterior in a layer-wise (Kronecker) eigenbasis."""

from .bases import PosteriorBasis
from .kl import binary_kl, gaussian_kl, kl_inverse
from .pac_bayes import PACBayesBound, default_error_fn, pac_bayes_bound

__all__ = [
    "PACBayesBound",
    "PosteriorBasis",
    "binary_kl",
    "default_error_fn",
    "gaussian_kl",
    "kl_inverse",
    "pac_bayes_bound",
]
