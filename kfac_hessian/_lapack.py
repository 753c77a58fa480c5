"""Three LAPACK routines called without the GIL: ``sytrd`` (tridiagonalization), ``sterf`` (eigenvalues of a
symmetric tridiagonal matrix) and ``syevd`` (all eigenvalues and eigenvectors, divide and conquer), in single and
double precision.

scipy's Python LAPACK wrappers hold the GIL for the whole call, so decompositions of independent factors cannot
overlap in threads. The raw routines that ``scipy.linalg.cython_lapack`` exports (C function pointers with
Fortran-style pointer arguments, a public scipy interface) are called here through ``ctypes``, which releases the
GIL for the duration of a foreign call.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
import scipy.linalg.cython_lapack as cython_lapack

_INT_P = ctypes.POINTER(ctypes.c_int)
_REAL_P = {"s": ctypes.POINTER(ctypes.c_float), "d": ctypes.POINTER(ctypes.c_double)}
_DTYPE = {"s": np.float32, "d": np.float64}


@cache
def _routine(name: str):
    capsule = cython_lapack.__pyx_capi__[name]
    capsule_name = ctypes.pythonapi.PyCapsule_GetName
    capsule_name.restype, capsule_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    pointer = ctypes.pythonapi.PyCapsule_GetPointer
    pointer.restype, pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    real = _REAL_P[name[0]]
    if name.endswith("sytrd"):  # uplo, n, a, lda, d, e, tau, work, lwork, info
        signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, _INT_P, real, _INT_P, real, real, real, real, _INT_P,
                                     _INT_P)
    elif name.endswith("syevd"):  # jobz, uplo, n, a, lda, w, work, lwork, iwork, liwork, info
        signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, _INT_P, real, _INT_P, real, real, _INT_P,
                                     _INT_P, _INT_P, _INT_P)
    else:  # sterf: n, d, e, info
        signature = ctypes.CFUNCTYPE(None, _INT_P, real, real, _INT_P)
    return signature(pointer(capsule, capsule_name(capsule)))


def _ptr(array: np.ndarray, prefix: str):
    return array.ctypes.data_as(_REAL_P[prefix])


def sytrd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``Qᵀ M Q = T`` (lower storage) of a symmetric ``(n, n)`` float32/float64 matrix: ``(reflectors, diagonal,
    off_diagonal, tau, info)`` as ``scipy.linalg.lapack.?sytrd(…, lower=1)`` returns them."""
    prefix = "s" if matrix.dtype == np.float32 else "d"
    n = matrix.shape[0]
    # a symmetric matrix is its own transpose: the C-ordered copy read as Fortran-ordered is the same matrix
    a = np.array(matrix, dtype=_DTYPE[prefix], order="C", copy=True)
    diagonal = np.empty(n, a.dtype)
    off_diagonal, tau = np.empty(max(n - 1, 1), a.dtype), np.empty(max(n - 1, 1), a.dtype)
    size, info, lwork = ctypes.c_int(n), ctypes.c_int(0), ctypes.c_int(-1)
    query = np.empty(1, a.dtype)
    routine = _routine(f"{prefix}sytrd")
    args = (b"L", ctypes.byref(size), _ptr(a, prefix), ctypes.byref(size), _ptr(diagonal, prefix),
            _ptr(off_diagonal, prefix), _ptr(tau, prefix))
    routine(*args, _ptr(query, prefix), ctypes.byref(lwork), ctypes.byref(info))
    work = np.empty(max(1, int(query[0])), a.dtype)
    lwork = ctypes.c_int(len(work))
    routine(*args, _ptr(work, prefix), ctypes.byref(lwork), ctypes.byref(info))
    return a.T, diagonal, off_diagonal[: n - 1], tau[: n - 1], info.value


def sterf(diagonal: np.ndarray, off_diagonal: np.ndarray) -> tuple[np.ndarray, int]:
    """Eigenvalues (ascending) of the symmetric tridiagonal matrix, and LAPACK's ``info``."""
    prefix = "s" if diagonal.dtype == np.float32 else "d"
    values = np.array(diagonal, copy=True)
    work = np.zeros(max(len(values) - 1, 1), values.dtype)
    work[: len(off_diagonal)] = off_diagonal
    size, info = ctypes.c_int(len(values)), ctypes.c_int(0)
    _routine(f"{prefix}sterf")(ctypes.byref(size), _ptr(values, prefix), _ptr(work, prefix), ctypes.byref(info))
    return values, info.value


def syevd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Eigenvalues (ascending) and orthonormal eigenvectors (the columns of an ``(n, n)`` array) of a symmetric
    float32/float64 matrix, and LAPACK's ``info`` (``scipy.linalg.eigh(…, driver="evd")`` without the GIL)."""
    prefix = "s" if matrix.dtype == np.float32 else "d"
    n = matrix.shape[0]
    # C-ordered symmetric input read as Fortran-ordered is the same matrix; the eigenvectors come back Fortran-ordered
    a = np.array(matrix, dtype=_DTYPE[prefix], order="C", copy=True)
    values = np.empty(n, a.dtype)
    size, info = ctypes.c_int(n), ctypes.c_int(0)
    routine = _routine(f"{prefix}syevd")

    def call(work: np.ndarray, iwork: np.ndarray, query: bool) -> None:
        lwork, liwork = (ctypes.c_int(-1), ctypes.c_int(-1)) if query else (ctypes.c_int(len(work)),
                                                                              ctypes.c_int(len(iwork)))
        routine(b"V", b"L", ctypes.byref(size), _ptr(a, prefix), ctypes.byref(size), _ptr(values, prefix),
                _ptr(work, prefix), ctypes.byref(lwork), iwork.ctypes.data_as(_INT_P), ctypes.byref(liwork),
                ctypes.byref(info))

    work, iwork = np.empty(1, a.dtype), np.empty(1, np.int32)
    call(work, iwork, query=True)  # the sizes of the workspaces
    call(np.empty(max(1, int(work[0])), a.dtype), np.empty(max(1, int(iwork[0])), np.int32), query=False)
    return values, a.T, info.value
