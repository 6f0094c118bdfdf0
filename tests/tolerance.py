"""Tolerances relative to the magnitudes compared, for comparisons of two float32 computation paths.

An absolute bound such as ``atol=1e-5`` on values of order one is a bound of ~100 float32 ulps: it holds or fails
with the CPU's vector width (the order in which a sum's terms are added). ``max|ours - ref| <= tol * max|ref|``
does not depend on the scale of the values, and ``terms`` widens it for a reduction over many terms (the rounding
of a float32 sum of N terms grows with N; the bound grows with sqrt(N), the typical random-walk growth).
"""

import numpy as np


def rel_err(ours, ref, mask=None) -> float:
    """max|ours - ref| / max|ref| (in float64; over ``mask``'s True entries when given)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300))


def assert_close_rel(ours, ref, rtol: float, *, terms: int = 1, mask=None, what: str = "") -> None:
    """Asserts max|ours - ref| <= rtol * sqrt(terms) * max|ref| (shapes equal)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    bound = rtol * np.sqrt(terms)
    err = rel_err(ours, ref, mask)
    assert err <= bound, f"{what}: max|ours - ref| / max|ref| = {err:.3g} > {bound:.3g}"
