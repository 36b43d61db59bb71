"""Symmetric matrices as their upper triangles: how a SignatureWindow's signature matrices travel.

>>> import numpy as np
>>> m = np.array([[1, 2], [2, 3]], np.float32)
>>> pack_symmetric(m).tolist(), unpack_symmetric(pack_symmetric(m), 2).tolist()
([1.0, 2.0, 3.0], [[1.0, 2.0], [2.0, 3.0]])
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _triu(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n)


def pack_symmetric(mats: np.ndarray) -> np.ndarray:
    """[..., N, N] symmetric -> [..., N(N+1)/2] upper triangles (float32)."""
    iu = _triu(mats.shape[-1])
    return np.ascontiguousarray(mats[..., iu[0], iu[1]], dtype=np.float32)


def unpack_symmetric(tri: np.ndarray, n: int) -> np.ndarray:
    """[..., N(N+1)/2] -> [..., N, N] symmetric (float32)."""
    iu = _triu(n)
    out = np.empty(tri.shape[:-1] + (n, n), dtype=np.float32)
    out[..., iu[0], iu[1]] = tri
    out[..., iu[1], iu[0]] = tri
    return out
