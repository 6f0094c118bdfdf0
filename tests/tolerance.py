"""Tolerances relative to the magnitudes compared, for comparisons of two float32 computation paths.

An absolute bound such as ``atol=1e-5`` on values of order one is a bound of ~100 float32 ulps, and an element-wise
relative bound fails on elements near zero: either holds or fails with the CPU's vector width (the order in which
a sum's terms are added). ``max|ours - ref| <= tol * max|ref|`` does not depend on the scale of the values.
"""

import numpy as np


def rel_err(ours, ref, mask=None) -> float:
    """max|ours - ref| / max|ref| (in float64; over ``mask``'s True entries when given)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        ours, ref = ours[mask.astype(bool)], ref[mask.astype(bool)]
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-300))


def assert_close_rel(ours, ref, rtol: float, *, what: str = "") -> None:
    """Asserts equal shapes and max|ours - ref| <= rtol * max|ref|."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = rel_err(ours, ref)
    assert err <= rtol, f"{what}: max|ours - ref| / max|ref| = {err:.3g} > {rtol:.3g}"
