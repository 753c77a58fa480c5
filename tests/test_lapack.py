"""The GIL-free LAPACK calls against scipy's."""

from __future__ import annotations

from .conftest import psd as _psd


def test_the_lapack_calls_equal_scipys():
    from scipy.linalg import lapack

    from kfac_hessian import _lapack

    matrix = _psd(37).numpy()
    reflectors, diagonal, off_diagonal, tau, info = _lapack.sytrd(matrix)
    expected = lapack.dsytrd(matrix, lower=1)
    assert info == 0 and expected[-1] == 0
    for ours, theirs in zip((reflectors, diagonal, off_diagonal, tau), expected[:4]):
        assert abs(ours - theirs).max() < 1e-12
    values, info = _lapack.sterf(diagonal, off_diagonal)
    assert info == 0 and abs(values - lapack.dsterf(diagonal, off_diagonal)[0]).max() < 1e-12


def test_syevd_equals_scipys_eigh():
    import numpy as np
    from scipy.linalg import eigh

    from kfac_hessian import _lapack

    for n in (1, 37):
        matrix = _psd(n).numpy()
        values, vectors, info = _lapack.syevd(matrix)
        expected_values, expected_vectors = eigh(matrix, driver="evd")
        assert info == 0 and abs(values - expected_values).max() < 1e-12 * expected_values.max()
        assert abs(abs(vectors.T @ expected_vectors) - np.eye(n)).max() < 1e-10  # the same vectors, up to sign
