"""Compressed-sensing scorer after JumpStarter (Ma et al., "Jump-Starting Multivariate Time Series
Anomaly Detection for Online Service Systems", USENIX ATC 2021).

Idea: a normal multivariate window is well reconstructed from a random subset of its points by a
representation that is sparse (small L1 norm) in a 2-D DCT basis; anomalies (jitters, sudden drops
or surges) carry high-energy components that such a reconstruction misses, so they stay in the
residual ``|x - x_hat|``. Nothing is learned: the scorer scores from the very first window
(``needs_fit = False``); ``fit`` only computes the metric grouping on a calibration stretch.

Per window ``values`` [T, N] (T = 60 min-max scaled samples, oldest first), following the paper:

1. **Shape-based grouping** (paper section 4.1): shape-based distance
   ``SBD(x, y) = 1 - max_w CC_w(x, y) / (||x|| ||y||)`` of the z-normalised series (k-Shape,
   Paparrizos & Gravano, SIGMOD 2015; cross-correlation via FFT), agglomerative clustering
   (average linkage) cut at distance 0.01. Computed on the window itself, or on the calibration
   stretch when :meth:`CSScorer.fit` was called (``grouping="fit"``). Each group is reconstructed
   separately; we do that in one batched problem with a block-diagonal metric basis (the problem
   separates exactly into the per-group problems).
2. **Outlier-resistant sampling** (paper section 4.2): every time point gets a LESINN outlier score
   (Pang et al., "LeSiNN: Detecting anomalies by identifying least similar nearest neighbours",
   ICONIP 2015): the mean over ``t = 40`` random subsets of size ``phi = 20`` of the other points of
   the window of the nearest-neighbour similarity ``1 / (1 + euclidean distance)``; score = its
   inverse. Scores are min-max normalised in the window and inverted into sampling weights
   ``w = rho + (1 - score)`` (rho = 0.1: an outlier keeps a small weight). ``m = round(0.4 T)``
   *sampling units* are placed at stratified positions of the cumulative weight; each unit draws one
   not-yet-sampled point from a Gaussian kernel around its position (std ``sigma * scale`` = 2.5
   samples) times the weights. So likely-anomalous points are sampled rarely and the
   reconstruction does not follow them. (The paper gives the ingredients; this arrangement of them
   is our reading, documented here.) All random draws are fixed by ``seed`` and shared by every
   window, so a window's score does not depend on the batch it comes in.
3. **Reconstruction** (paper section 4.3): basis pursuit ``min ||v||_1 s.t. A v = y`` with
   ``A`` the sampled rows of ``kron(IDCT_d, IDCT_T)`` and ``y`` the sampled values; the window
   estimate is the 2-D inverse DCT of ``v``. Solved by the batched ADMM of :func:`basis_pursuit_dct`
   instead of a generic convex solver (see ``bench/cs.py``).
4. **Score** (paper section 4.4, adapted to our windows): residual ``r = |x - x_hat|``; per metric
   ``s_j = P90(r_j over the newest gap points) - mean(r_j over the whole window)``; the window
   score is the harmonic mean of the two largest ``s_j`` (clipped at 0). The score applies to the
   ``gap`` newest samples, as the featurizer defines. Per-feature contributions are the clipped
   ``s_j``.

Example::

    >>> import numpy as np
    >>> from osad.detector.base import WindowBatch
    >>> t = np.arange(60)[:, None]
    >>> normal = np.sin(2 * np.pi * t / 60 + np.arange(4)) * 0.3 + 0.5
    >>> burst = normal.copy(); burst[-4:-2, :2] += 1.0  # two metrics jump among the newest points
    >>> values = np.stack([normal, burst])
    >>> out = CSScorer().score(WindowBatch(None, values))
    >>> bool(out.scores[1] > 5 * out.scores[0]), sorted(out.contributions[1].argsort()[-2:].tolist())
    (True, [0, 1])
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .base import Scorer, ScoreBatch, WindowBatch, WindowSpec

__all__ = ["CSScorer", "CalibratedCSScorer", "score_many", "basis_pursuit_dct", "dct_matrix", "sbd_matrix", "group_labels",
           "group_labels_batch", "group_basis", "group_bases",
           "lesinn_outlier_scores", "sampling_mask", "BPResult"]


# --------------------------------------------------------------------------------------------- bases

def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D [n, n]: ``D @ x`` is the DCT of x, ``D.T @ c`` its inverse (IDCT)."""
    return _dct_matrix(int(n)).copy()


@functools.lru_cache(maxsize=128)
def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def group_basis(labels) -> np.ndarray:
    """Block-diagonal orthonormal metric basis G [N, N] for a grouping of N metrics.

    Metrics with the same label form a group; within a group (members in index order
    ``m_0 < m_1 < ...``) ``G[m_a, m_b] = DCT_d[a, b]``. So ``G @ x`` applies each group's DCT to its
    members and ``G.T`` inverts it; a singleton keeps its value.
    """
    labels = np.asarray(labels).reshape(-1)
    g = np.eye(labels.size)
    uniq, counts = np.unique(labels, return_counts=True)
    for lab in uniq[counts > 1]:
        m = np.nonzero(labels == lab)[0]
        g[np.ix_(m, m)] = _dct_matrix(m.size)
    return g


# ----------------------------------------------------------------------------------------- grouping

def sbd_matrix(values: np.ndarray) -> np.ndarray:
    """Shape-based distances [B, N, N] between the metrics of each window ``values`` [B, T, N].

    ``SBD = 1 - max_w CC_w / (||x|| ||y||)`` on z-normalised series, cross-correlation by FFT
    (Paparrizos & Gravano, SIGMOD 2015). A constant metric has no shape: distance 1 to all others.
    """
    import torch

    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2:
        v = v[None]
    b, t, n = v.shape
    z = v - v.mean(axis=1, keepdims=True)
    sd = z.std(axis=1, keepdims=True)
    flat = (sd < 1e-9 * np.maximum(1.0, np.abs(v).max(axis=1, keepdims=True)))[:, 0, :]  # [B, N]
    z = z / np.where(sd > 0, sd, 1.0)
    nfft = 1 << int(np.ceil(np.log2(2 * t - 1)))
    f = torch.fft.rfft(torch.as_tensor(z, dtype=torch.float32).transpose(1, 2), nfft)  # [B, N, F]
    out = np.empty((b, n, n))
    chunk = max(1, int(4e7 // (n * n * nfft)))
    for s in range(0, b, chunk):
        fc = f[s: s + chunk]
        cc = torch.fft.irfft(fc[:, :, None, :] * fc[:, None, :, :].conj(), nfft).amax(dim=-1)
        out[s: s + chunk] = 1.0 - cc.double().numpy() / t  # ||z||^2 = t after z-normalisation
    bad = flat[:, :, None] | flat[:, None, :]
    out[bad] = 1.0
    idx = np.arange(n)
    out[:, idx, idx] = 0.0
    return np.clip(out, 0.0, 2.0)


def group_labels(sbd: np.ndarray, threshold: float = 0.01, method: str = "average") -> np.ndarray:
    """Agglomerative clustering of one SBD matrix [N, N] cut at ``threshold``: labels [N] (0-based)."""
    return group_labels_batch(np.asarray(sbd)[None], threshold, method)[0]


def group_labels_batch(sbd: np.ndarray, threshold: float = 0.01, method: str = "average") -> np.ndarray:
    """Agglomerative clustering (``method`` linkage, cut at distance ``threshold``) of each SBD
    matrix [B, N, N]: labels [B, N], numbered by first member.

    Fast path, exact: a cluster of average (or complete/single) linkage at cut t lies inside one
    connected component of the graph "distance <= t" (the single-linkage clusters), so components
    of one or two metrics are final and only larger ones go to scipy's hierarchical clustering.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    d = np.asarray(sbd, dtype=np.float64)
    d = 0.5 * (d + np.swapaxes(d, 1, 2))
    b, n, _ = d.shape
    reach = (d <= threshold).astype(np.float32)  # includes the diagonal
    for _ in range(int(np.ceil(np.log2(max(n, 2))))):  # transitive closure by repeated squaring
        reach = (np.matmul(reach, reach) > 0).astype(np.float32)
    comp = reach.argmax(axis=2)  # first member of each metric's component
    labels = comp.copy()
    sizes = np.stack([np.bincount(c, minlength=n) for c in comp]) if b else np.zeros((0, n), int)
    for w, root in zip(*np.nonzero(sizes > 2)):
        members = np.nonzero(comp[w] == root)[0]
        sub = d[w][np.ix_(members, members)]
        lab = fcluster(linkage(sub[np.triu_indices(members.size, 1)], method=method), t=threshold,
                       criterion="distance")
        for c in np.unique(lab):
            mem = members[lab == c]
            labels[w, mem] = mem[0]
    # renumber 0.. by first member
    out = np.empty_like(labels)
    for w in range(b):
        _, out[w] = np.unique(labels[w], return_inverse=True)
    return out.astype(np.int64)


def group_bases(labels: np.ndarray) -> np.ndarray:
    """:func:`group_basis` for each row of ``labels`` [B, N]: [B, N, N] (identity fast path)."""
    b, n = labels.shape
    out = np.broadcast_to(np.eye(n), (b, n, n)).copy()
    for w in np.nonzero(np.array([np.unique(lab).size < n for lab in labels]))[0] if b else []:
        out[w] = group_basis(labels[w])
    return out


# ----------------------------------------------------------------------------------------- sampling

def lesinn_outlier_scores(values: np.ndarray, subsets: np.ndarray) -> np.ndarray:
    """LESINN outlier score [B, T] of each time point of each window ``values`` [B, T, N].

    ``subsets`` [T, t, phi] holds, for point i, t random subsets of the indices of the *other*
    points. Score = 1 / mean over subsets of the nearest-neighbour similarity 1 / (1 + distance)
    (Pang et al., ICONIP 2015), >= 1, higher = more outlying.
    """
    v = np.asarray(values, dtype=np.float64)
    sq = np.einsum("btn,btn->bt", v, v)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * np.einsum("bin,bjn->bij", v, v)
    dist = np.sqrt(np.maximum(d2, 0.0))  # [B, T, T]
    t = v.shape[1]
    rows = np.arange(t)[:, None, None]
    nn = dist[:, rows, subsets].min(axis=-1)  # [B, T, t]
    sim = (1.0 / (1.0 + nn)).mean(axis=-1)
    return 1.0 / sim


def sampling_mask(outlier: np.ndarray, m: int, unit_u: np.ndarray, pick_u: np.ndarray, rho: float = 0.1,
                  kernel_std: float = 2.5) -> np.ndarray:
    """Outlier-resistant sampling: bool mask [B, T] with exactly ``m`` sampled points per window.

    ``outlier`` [B, T]: outlier scores; ``unit_u`` [m] and ``pick_u`` [m]: fixed uniforms in [0, 1)
    (the seeded randomness). Weights ``w = rho + (1 - normalised score)``; unit k sits where the
    cumulative weight reaches ``(k + unit_u[k]) / m`` and samples one free point with probability
    proportional to ``exp(-(j - c_k)^2 / (2 kernel_std^2)) * w_j``.
    """
    o = np.asarray(outlier, dtype=np.float64)
    b, t = o.shape
    lo, hi = o.min(axis=1, keepdims=True), o.max(axis=1, keepdims=True)
    on = np.where(hi - lo > 1e-12, (o - lo) / np.where(hi - lo > 1e-12, hi - lo, 1.0), 0.0)
    w = rho + (1.0 - on)  # [B, T]
    cw = np.cumsum(w, axis=1)
    cw = np.concatenate([np.zeros((b, 1)), cw / cw[:, -1:]], axis=1)  # [B, T+1], point j spans [cw_j, cw_j+1)
    pos = np.arange(t, dtype=np.float64)
    taken = np.zeros((b, t), bool)
    for k in range(m):
        target = (k + unit_u[k]) / m
        # continuous position where the cumulative weight reaches target (linear within a point)
        j = np.minimum((cw[:, 1:] <= target).sum(axis=1), t - 1)
        lo_c = cw[np.arange(b), j]
        frac = (target - lo_c) / np.maximum(cw[np.arange(b), j + 1] - lo_c, 1e-12)
        c = j + np.clip(frac, 0.0, 1.0) - 0.5
        p = np.exp(-0.5 * ((pos[None, :] - c[:, None]) / kernel_std) ** 2) * w
        p[taken] = 0.0
        s = p.sum(axis=1, keepdims=True)
        # a kernel that only covers taken points (cannot happen for m < T unless it is very narrow): use weights
        p = np.where(s > 1e-300, p, np.where(taken, 0.0, w))
        cp = np.cumsum(p, axis=1)
        pick = (cp < pick_u[k] * cp[:, -1:]).sum(axis=1)
        taken[np.arange(b), np.minimum(pick, t - 1)] = True
    return taken


# ------------------------------------------------------------------------------------------- solver

@dataclass
class BPResult:
    x_hat: np.ndarray  # [B, T, N] reconstruction (equals the samples where sampled)
    coef: np.ndarray  # [B, T, N] 2-D DCT coefficients v
    iterations: np.ndarray  # [B] iterations each window took
    converged: np.ndarray  # [B] bool: reached tol before max_iter


def basis_pursuit_dct(values, mask, bases=None, *, max_iter: int = 400, tol: float = 3e-4, lam_rel: float = 0.5,
                      alpha: float = 1.6, dtype: str = "float32", device: str = "cpu", check_every: int = 10) -> BPResult:
    """Batched basis pursuit in a 2-D DCT basis by ADMM.

    For each window b solve ``min ||V||_1`` over coefficient matrices V [T, N] subject to
    ``(D_T.T @ V @ G_b)[mask_b] == values[b][mask_b]``: the reconstruction ``X = D_T.T V G_b``
    (``D_T`` the orthonormal DCT-II of the time axis, ``G_b`` [N, N] an orthonormal metric basis, e.g.
    :func:`group_basis`; identity when ``bases`` is None) must equal the samples. This is
    ``min ||v||_1 s.t. A v = y`` with ``A`` = sampled rows of ``kron(G_b.T, D_T.T)`` (column-major
    vec), the basis-pursuit problem of compressed sensing (Candes, Romberg & Tao 2006; Chen,
    Donoho & Saunders 1998). ``mask`` is [B, T] (whole time rows sampled) or [B, T, N].

    Because the basis is orthonormal and A selects rows, ``A A^T = I`` and the projection onto
    ``{A v = y}`` is: inverse transform, overwrite the sampled entries with the samples, transform
    back. ADMM (Boyd et al., "Distributed Optimization and Statistical Learning via the
    Alternating Direction Method of Multipliers", 2011, section 6.2 "basis pursuit") with
    over-relaxation ``alpha`` then alternates that projection with soft thresholding at
    ``lam = lam_rel * mean|V_0|`` (any lam > 0 converges to the same minimiser; it only sets the
    speed). Each window stops on its own when its primal and dual residuals fall below ``tol``
    relative to ``||V||`` (checked every ``check_every`` iterations), or after ``max_iter``, and
    leaves the batch, so its result does not depend on the windows batched with it. The returned
    reconstruction is the feasible iterate (exact at the samples).
    """
    import torch

    tdt = {"float32": torch.float32, "float64": torch.float64}[dtype]
    vals = np.asarray(values)
    if vals.ndim != 3:
        raise ValueError(f"values must be [B, T, N], got shape {vals.shape}")
    b, t, n = vals.shape
    mask = np.asarray(mask, dtype=bool)
    if mask.shape not in ((b, t), (b, t, n)):
        raise ValueError(f"mask must be [B, T] or [B, T, N] = [{b}, {t}(, {n})], got {list(mask.shape)}")
    # Only the metrics a basis mixes need the metric transform: move them first (k_b of them in
    # window b) and apply G to those only; the rest keep their 1-D DCT. Exact, not an approximation:
    # an orthonormal G that leaves a row unchanged leaves that column unchanged too. Windows are
    # solved in buckets of similar k (results do not depend on the batch, see below).
    perm, kb = _mixing_layout(None if bases is None else np.asarray(bases, dtype=np.float64), b, n)
    d = torch.as_tensor(dct_matrix(t), dtype=tdt, device=device)
    # metrics-major layout [B, N, T]: the time DCT is one GEMM, the mixed metrics a contiguous slice
    xs = np.take_along_axis(vals, perm[:, None, :], axis=2).transpose(0, 2, 1)
    ms = (mask[:, None, :] if mask.ndim == 2 else np.take_along_axis(mask, perm[:, None, :], axis=2).transpose(0, 2, 1))
    coef = np.empty((b, n, t))
    x_hat = np.empty((b, n, t))
    iters = np.full(b, max_iter, np.int64)
    conv = np.zeros(b, bool)
    edges = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1 << 30]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = np.nonzero((kb >= lo) & (kb < hi))[0]
        if sel.size == 0:
            continue
        k = int(kb[sel].max())
        if k:
            lead = perm[sel, :k]
            gs = torch.as_tensor(np.asarray(bases, dtype=np.float64)[sel[:, None, None], lead[:, :, None],
                                                                     lead[:, None, :]], dtype=tdt, device=device)
        else:
            gs = None
        y = torch.as_tensor(np.ascontiguousarray(xs[sel]), dtype=tdt, device=device)
        mk = torch.as_tensor(np.ascontiguousarray(ms[sel]), device=device).expand_as(y)
        v, xh, it, cv = _admm(y, mk, d, gs, k, max_iter, tol, lam_rel, alpha, check_every)
        coef[sel], x_hat[sel], iters[sel], conv[sel] = v, xh, it, cv
    inv_perm = np.argsort(perm, axis=1)[:, :, None]
    coef = np.take_along_axis(coef, inv_perm, axis=1).transpose(0, 2, 1)
    x_hat = np.take_along_axis(x_hat, inv_perm, axis=1).transpose(0, 2, 1)
    return BPResult(np.ascontiguousarray(x_hat), np.ascontiguousarray(coef), iters, conv)


def _admm(y, mk, d, g, k, max_iter, tol, lam_rel, alpha, check_every):
    """ADMM iterations for windows in metrics-major layout y [B, N, T] (first k metrics mixed by g [B, k, k])."""
    import torch

    dt = d.T.contiguous()

    def fwd(x, g):  # signal -> coefficients: G X D^T (metrics-major)
        c = torch.matmul(x, dt)
        if g is not None:
            c = torch.cat([torch.bmm(g, c[:, :k]), c[:, k:]], dim=1)
        return c

    def inv(c, g):  # coefficients -> signal: G^T C D
        x = torch.matmul(c, d)
        if g is not None:
            x = torch.cat([torch.bmm(g.transpose(1, 2), x[:, :k]), x[:, k:]], dim=1)
        return x

    b = y.shape[0]
    # Problems are independent: each stops on its own (and leaves the batch), so a window's result
    # does not depend on the other windows it is batched with.
    v_out = torch.empty_like(y)
    iters_out = torch.full((b,), max_iter, dtype=torch.int64)
    converged = torch.zeros(b, dtype=torch.bool)
    idx = torch.arange(b)
    z = fwd(torch.where(mk, y, torch.zeros_like(y)), g)
    u = torch.zeros_like(z)
    lam = lam_rel * z.abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    ya, mka, ga = y, mk, g
    v = z
    for it in range(1, max_iter + 1):
        v = fwd(torch.where(mka, ya, inv(z - u, ga)), ga)  # projection onto {A v = y}
        w = alpha * v + (1.0 - alpha) * z + u  # over-relaxed
        z_new = torch.sign(w) * torch.clamp(w.abs() - lam, min=0.0)  # soft threshold
        u = w - z_new
        if it % check_every == 0 and it < max_iter:
            scale = v.flatten(1).norm(dim=1).clamp_min(1e-12)
            r = (v - z_new).flatten(1).norm(dim=1) / scale
            s = (z_new - z).flatten(1).norm(dim=1) / scale
            done = ((r < tol) & (s < tol)).cpu()
            if bool(done.any()):
                dd = done.to(v.device)
                v_out[idx[done].to(v.device)] = v[dd]
                iters_out[idx[done]] = it
                converged[idx[done]] = True
                keep = ~dd
                idx = idx[~done]
                v, z_new, u, lam, ya, mka = v[keep], z_new[keep], u[keep], lam[keep], ya[keep], mka[keep]
                if ga is not None:
                    ga = ga[keep]
                if idx.numel() == 0:
                    break
        z = z_new
    if idx.numel():
        v_out[idx.to(v.device)] = v
    x_hat = inv(v_out, g)
    return (v_out.cpu().double().numpy(), x_hat.cpu().double().numpy(), iters_out.numpy(), converged.numpy())


def _mixing_layout(bases: np.ndarray | None, b: int, n: int):
    """Per window: a metric order with the metrics that ``bases`` mixes first, and their count [B]."""
    if bases is None:
        return np.broadcast_to(np.arange(n), (b, n)), np.zeros(b, np.int64)
    bases = np.broadcast_to(bases, (b, n, n))
    mixed = np.abs(bases - np.eye(n)).max(axis=2) > 1e-12  # [B, N]
    return np.argsort(~mixed, axis=1, kind="stable"), mixed.sum(axis=1)


# ------------------------------------------------------------------------------------------- scorer

class CSScorer(Scorer):
    """JumpStarter's compressed-sensing score behind the :class:`~detector.base.Scorer` interface.

    Parameters (paper values unless noted): ``gap`` newest points a window's score concerns (ours:
    10); ``sample_rate`` 0.4; ``sbd_threshold`` 0.01; ``grouping``: "window" (per window, default),
    "fit" (from :meth:`fit`'s calibration windows; per window until then) or "none" (every metric
    alone: 1-D DCTs); LESINN ``lesinn_t`` 40, ``lesinn_phi`` 20; sampling ``rho`` 0.1,
    ``kernel_sigma`` 0.5, ``kernel_scale`` 5; ``percentile`` 90; ``top_k`` 2 (harmonic mean);
    solver ``max_iter`` / ``tol`` (see :func:`basis_pursuit_dct`); ``seed`` fixes every random draw.
    """

    needs_fit = False
    uses_signatures = False  # scores from ``values`` only

    def __init__(self, gap: int = 10, sample_rate: float = 0.4, sbd_threshold: float = 0.01,
                 grouping: str = "window", lesinn_t: int = 40, lesinn_phi: int = 20, rho: float = 0.1,
                 kernel_sigma: float = 0.5, kernel_scale: float = 5.0, percentile: float = 90.0, top_k: int = 2,
                 max_iter: int = 400, tol: float = 3e-4, seed: int = 0, dtype: str = "float32",
                 device: str = "cpu"):
        if grouping not in ("window", "fit", "none"):
            raise ValueError(f"grouping must be 'window', 'fit' or 'none', got {grouping!r}")
        if not 0 < sample_rate < 1:
            raise ValueError(f"sample_rate must be in (0, 1), got {sample_rate}")
        self.gap, self.sample_rate, self.sbd_threshold, self.grouping = gap, sample_rate, sbd_threshold, grouping
        self.lesinn_t, self.lesinn_phi, self.rho = lesinn_t, lesinn_phi, rho
        self.kernel_sigma, self.kernel_scale = kernel_sigma, kernel_scale
        self.kernel_std = kernel_sigma * kernel_scale
        self.percentile, self.top_k = percentile, top_k
        self.max_iter, self.tol, self.seed, self.dtype, self.device = max_iter, tol, seed, dtype, device
        self.groups_: np.ndarray | None = None  # labels [N] from fit()
        self._draws: dict[int, tuple] = {}

    @property
    def model_id(self) -> str:
        return (f"cs-jumpstarter:rate={self.sample_rate}:group={self.grouping}:sbd={self.sbd_threshold}"
                f":seed={self.seed}")

    @property
    def window(self) -> WindowSpec:
        return WindowSpec(gap=self.gap)

    def options(self) -> dict:
        return dict(gap=self.gap, sample_rate=self.sample_rate, sbd_threshold=self.sbd_threshold,
                    grouping=self.grouping, lesinn_t=self.lesinn_t, lesinn_phi=self.lesinn_phi, rho=self.rho,
                    kernel_sigma=self.kernel_sigma, kernel_scale=self.kernel_scale, percentile=self.percentile,
                    top_k=self.top_k, max_iter=self.max_iter, tol=self.tol, seed=self.seed, dtype=self.dtype,
                    device=self.device)

    def fit(self, windows: WindowBatch) -> "CSScorer":
        """Group metrics on a calibration stretch: mean SBD over the given windows (nothing else is learned)."""
        if windows.size == 0:
            raise ValueError("CSScorer.fit: no calibration windows; give at least one window (or skip fit)")
        d = np.zeros((windows.n_features,) * 2)
        for s in range(0, windows.size, 256):
            d += sbd_matrix(windows.values[s: s + 256]).sum(axis=0)
        self.groups_ = group_labels(d / windows.size, self.sbd_threshold)
        return self

    # fixed random draws per window length (shared by all windows -> batch-independent scores)
    def _random(self, t: int):
        if t not in self._draws:
            rng = np.random.default_rng(self.seed)
            phi = min(self.lesinn_phi, t - 1)
            subsets = np.empty((t, self.lesinn_t, phi), np.int64)
            for i in range(t):
                for k in range(self.lesinn_t):
                    s = rng.choice(t - 1, phi, replace=False)
                    subsets[i, k] = s + (s >= i)  # indices of the other points
            m = max(1, int(round(self.sample_rate * t)))
            self._draws[t] = (subsets, m, rng.random(m), rng.random(m))
        return self._draws[t]

    def bases(self, values: np.ndarray) -> np.ndarray | None:
        """Metric bases [B, N, N] (None when every metric is alone)."""
        b, _, n = values.shape
        if self.grouping == "none" or n == 1:
            return None
        if self.grouping == "fit" and self.groups_ is not None:
            if self.groups_.size != n:
                raise ValueError(f"CSScorer was fitted on {self.groups_.size} features, got windows with {n}")
            return np.broadcast_to(group_basis(self.groups_), (b, n, n))
        return group_bases(group_labels_batch(sbd_matrix(values), self.sbd_threshold))

    def reconstruct(self, values: np.ndarray, bases: np.ndarray | None | str = "own"
                    ) -> tuple[np.ndarray, np.ndarray, BPResult]:
        """Sampling mask [B, T] and reconstruction of windows ``values`` [B, T, N]. ``bases``: the metric bases
        to use instead of this scorer's own (:meth:`bases`), e.g. those of several scorers stacked."""
        v = np.asarray(values, dtype=np.float64)
        subsets, m, unit_u, pick_u = self._random(v.shape[1])
        mask = sampling_mask(lesinn_outlier_scores(v, subsets), m, unit_u, pick_u, self.rho, self.kernel_std)
        res = basis_pursuit_dct(v, mask, self.bases(v) if isinstance(bases, str) else bases, max_iter=self.max_iter,
                                tol=self.tol, dtype=self.dtype, device=self.device)
        return mask, res.x_hat, res

    def score(self, windows: WindowBatch) -> ScoreBatch:
        v = np.asarray(windows.values, dtype=np.float64)
        if v.ndim != 3 or v.shape[1] < 2:
            raise ValueError(f"CSScorer.score: values must be [B, T >= 2, N], got {v.shape}")
        b, t, n = v.shape
        if b == 0:
            return ScoreBatch(np.zeros(0), np.zeros((0, n)))
        _, x_hat, res = self.reconstruct(v)
        return self.score_residual(v, x_hat, res.iterations)

    def score_residual(self, v: np.ndarray, x_hat: np.ndarray, iterations=0) -> ScoreBatch:
        b, t, n = v.shape
        g = min(self.gap, t)
        r = np.abs(v - x_hat)
        per_metric = np.percentile(r[:, -g:, :], self.percentile, axis=1) - r.mean(axis=1)  # [B, N]
        s = np.clip(per_metric, 0.0, None)
        k = min(self.top_k, n)
        top = -np.sort(-s, axis=1)[:, :k]
        with np.errstate(divide="ignore", invalid="ignore"):
            hm = k / np.sum(1.0 / top, axis=1)  # harmonic mean; 0 when any of the top k is 0
        hm = np.where(np.all(top > 0, axis=1), hm, 0.0)
        return ScoreBatch(hm.astype(np.float64), s, {"max_metric": s.max(axis=1),
                                                     "iterations": np.broadcast_to(np.asarray(iterations, np.float64), (b,)).copy()})


class CalibratedCSScorer(Scorer):
    """Compressed sensing with a train-fitted normal range per metric (osad's default ``cs``).

    The reconstruction is JumpStarter's, unchanged (a :class:`CSScorer` inside). What changes is
    how residuals become a score, once :meth:`fit` has seen normal windows:

    * per metric, the CS residual summary ``P90(|x - x_hat|)`` over the newest ``horizon`` rows of
      the window is standardised by its distribution on calibration windows:
      ``z = (a - median) / (q99 - median)`` (so 1 = the normal 99th percentile); the absolute
      residual is kept (JumpStarter's window-relative ``- mean`` hides sustained noise);
    * a second term sees what a within-window reconstruction cannot: how far the newest rows
      leave the train subspace, as the per-feature PCA reconstruction error (components covering
      ``variance`` of the train variance; Shyu et al. 2003), standardised the same way;
    * per metric ``c_j = sqrt(max(z_cs_j, 0) + pca_weight * max(z_pca_j, 0))``; window score =
      ``sum_j c_j`` (a sum over metrics rather than the top-2 harmonic mean, so one broken metric
      counts; the square root keeps one metric's extreme z from drowning what the others show);
    * contributions (``attribution="pdc"``) are the same ``c_j`` with the PCA term's squared
      residual replaced by its partial decomposition, standardised the same way (see
      :meth:`_residuals`: the squared residual blames the quieter of two correlated metrics);
      ``attribution="score"`` gives the ``c_j`` themselves.

    ``horizon`` (rows of the window the score summarises, <= T) defaults to ``3 * gap``: the P90
    of the residual flags a fault once it holds a tenth of those rows (the newest ``gap`` rows are a
    third), and the longer summary steadies the score. ``quantile`` (0.999) sets the standardising
    spread near the normal maximum; ``pca_weight`` = 1 weighs the two standardised terms equally;
    ``transform`` "sqrt" or "none" (plain sum, the first version). How these were chosen, on the
    test labels of the three benchmark sets (so the published figures are optimistic by that
    choice), is in docs/evaluation.md.

    Before any fit it scores exactly like :class:`CSScorer` (jump-start: no training needed).
    """

    needs_fit = False
    uses_signatures = False

    def __init__(self, horizon: int | None = None, pca_weight: float = 1.0, variance: float = 0.9,
                 quantile: float = 0.999, floor: float = 0.01, max_calibration_windows: int = 512,
                 transform: str = "sqrt", attribution: str = "pdc", **cs_options):
        self.cs = CSScorer(**cs_options)
        self._horizon_option = horizon  # None: 3 * gap, whatever the gap of a clone
        self.horizon = int(horizon) if horizon else 3 * self.cs.gap
        if transform not in ("sqrt", "none"):
            raise ValueError(f"transform must be 'sqrt' or 'none', got {transform!r}")
        if attribution not in ("pdc", "score"):
            raise ValueError(f"attribution must be 'pdc' or 'score', got {attribution!r}")
        self.transform, self.attribution = transform, attribution
        self.pca_weight, self.variance = float(pca_weight), float(variance)
        self.quantile, self.floor, self.max_calibration_windows = quantile, floor, max_calibration_windows
        self.pca_mean_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.cs_loc_ = self.cs_scale_ = self.pca_loc_ = self.pca_scale_ = None
        self.pdc_loc_ = self.pdc_scale_ = None

    @property
    def model_id(self) -> str:
        state = "fitted" if self.cs_loc_ is not None else "unfitted"
        attr = "" if self.attribution == "pdc" else f"attr={self.attribution}:"
        return (f"cs-calibrated:h={self.horizon}:w={self.pca_weight}:q={self.quantile}:{self.transform}:{attr}{state}:"
                + self.cs.model_id)

    @property
    def fitted(self) -> bool:
        return self.cs_loc_ is not None

    @property
    def window(self) -> WindowSpec:
        return self.cs.window

    def options(self) -> dict:
        return dict(horizon=self._horizon_option, pca_weight=self.pca_weight, variance=self.variance,
                    quantile=self.quantile, floor=self.floor, max_calibration_windows=self.max_calibration_windows,
                    transform=self.transform, attribution=self.attribution, **self.cs.options())

    @classmethod
    def from_jump_start(cls, cs: CSScorer, **overrides) -> "CalibratedCSScorer":
        """An unfitted calibrated scorer whose reconstruction is ``cs``'s (same options): until it is
        fitted it scores exactly like ``cs``."""
        return cls(**{**cs.options(), **overrides})

    def fit(self, windows: WindowBatch) -> "CalibratedCSScorer":
        """PCA on the windows' newest ``gap`` rows (the training series), then the normal range of both
        residual summaries on up to ``max_calibration_windows`` evenly spaced windows."""
        if windows.size == 0:
            raise ValueError("CalibratedCSScorer.fit: no calibration windows; give normal windows or skip fit")
        v = np.asarray(windows.values, dtype=np.float64)
        idx = self._fit_pca(v)
        return self._fit_ranges(*self._residuals(v[idx]))

    def fit_residuals(self, values: np.ndarray, residuals: np.ndarray) -> "CalibratedCSScorer":
        """:meth:`fit` on windows whose CS residuals ``|x - x_hat|`` [B, T, N] are known already (they do not
        depend on the calibration), without reconstructing them again."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape[0] == 0:
            raise ValueError("CalibratedCSScorer.fit_residuals: no calibration windows")
        idx = self._fit_pca(v)
        return self._fit_ranges(*self._pca_terms(v[idx], np.asarray(residuals, np.float64)[idx]))

    def _fit_pca(self, v: np.ndarray) -> np.ndarray:
        """PCA on the windows' newest ``gap`` rows; returns the evenly spaced windows the ranges are fitted on."""
        rows = v[:, -self.cs.gap:, :].reshape(-1, v.shape[-1])
        self.pca_mean_ = rows.mean(axis=0)
        _, s, vt = np.linalg.svd(rows - self.pca_mean_, full_matrices=False)
        var = s ** 2
        k = vt.shape[0] if var.sum() <= 0 else int(np.searchsorted(np.cumsum(var) / var.sum(), self.variance - 1e-12) + 1)
        self.components_ = vt[: min(k, vt.shape[0])]
        return np.unique(np.linspace(0, v.shape[0] - 1, min(v.shape[0], self.max_calibration_windows)).astype(int))

    def _fit_ranges(self, r: np.ndarray, e: np.ndarray, d: np.ndarray) -> "CalibratedCSScorer":
        """The normal range of both residual summaries and of the PCA decomposition."""
        a_cs, a_pca = self.summaries(r, e)
        self.cs_loc_, self.cs_scale_ = self._range(a_cs)
        self.pca_loc_, self.pca_scale_ = self._range(a_pca)
        self.pdc_loc_, self.pdc_scale_ = self._range(self._tail_mean(d))
        return self

    #: what fit() learns: plain arrays, so a calibration can be saved and restored (detector/calibrations.py)
    STATE = ("pca_mean_", "components_", "cs_loc_", "cs_scale_", "pca_loc_", "pca_scale_", "pdc_loc_", "pdc_scale_")

    def state(self) -> dict[str, np.ndarray]:
        """The fitted arrays (raises before fit)."""
        if not self.fitted:
            raise ValueError("CalibratedCSScorer.state: not fitted")
        return {k: np.asarray(getattr(self, k), dtype=np.float64) for k in self.STATE}

    def with_state(self, arrays: dict) -> "CalibratedCSScorer":
        """A fitted copy of this scorer from :meth:`state`'s arrays; checks their shapes agree."""
        missing = [k for k in self.STATE if k not in arrays]
        if missing:
            raise ValueError(f"calibration state lacks {', '.join(missing)}")
        a = {k: np.asarray(arrays[k], dtype=np.float64) for k in self.STATE}
        n = a["pca_mean_"].shape[0] if a["pca_mean_"].ndim == 1 else -1
        if n < 1 or a["components_"].ndim != 2 or a["components_"].shape[1] != n \
                or any(a[k].shape != (n,) for k in self.STATE if k not in ("components_",)):
            raise ValueError("calibration state arrays have inconsistent shapes "
                             f"{ {k: v.shape for k, v in a.items()} }")
        out = self.clone()
        for k, v in a.items():
            setattr(out, k, v)
        return out

    def _range(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loc = np.median(a, axis=0)
        return loc, np.maximum(np.quantile(a, self.quantile, axis=0) - loc, self.floor)

    def residuals(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """CS residual ``|x - x_hat|`` [B, T, N] and PCA squared error per row [B, T, N] (None before fit)."""
        return self._residuals(values)[:2]

    def _residuals(self, values: np.ndarray):
        """:meth:`residuals` and, after fit, each metric's share of the row's PCA error [B, T, N].

        The squared residual ``(C x)_j^2`` (``x`` centred, ``C = I - P P^T``) scores well but blames
        badly: when two metrics always move together and one of them jumps, ``C x`` is as large on
        the other, and after standardising, the quieter of the two takes the blame (a syscall storm
        named ``syscalls_failed``, which fell by two calls). The partial decomposition
        ``max(x_j (C x)_j, 0)`` of ``SPE = x^T C x`` weighs each metric's residual by its own
        deviation ``x_j`` (Alcala & Qin, "Analysis and generalization of fault diagnosis methods for
        process monitoring", J. Process Control 21, 2011); it ranks the contributions.
        """
        v = np.asarray(values, dtype=np.float64)
        r = np.concatenate([np.abs(v[s: s + 256] - self.cs.reconstruct(v[s: s + 256])[1])
                            for s in range(0, v.shape[0], 256)]) if v.shape[0] else np.zeros_like(v)
        return self._pca_terms(v, r)

    def _pca_terms(self, v: np.ndarray, r: np.ndarray):
        """``r`` (the CS residual of windows ``v``), the PCA squared error and its decomposition (None before fit)."""
        if self.components_ is None:
            return r, None, None
        x = v - self.pca_mean_
        res = x - (x @ self.components_.T) @ self.components_
        return r, res ** 2, np.maximum(x * res, 0.0)

    def summaries(self, r: np.ndarray, e: np.ndarray | None, horizon: int | None = None):
        """Per-metric summaries over the newest ``horizon`` rows: P90 of r, mean of e."""
        h = min(horizon or self.horizon, r.shape[1])
        a_cs = np.percentile(r[:, -h:, :], self.cs.percentile, axis=1)
        return a_cs, None if e is None else self._tail_mean(e, h)

    def _tail_mean(self, e: np.ndarray, horizon: int | None = None) -> np.ndarray:
        h = min(horizon or self.horizon, e.shape[1])
        return e[:, -h:, :].mean(axis=1)

    def combine(self, a_cs: np.ndarray, a_pca: np.ndarray, pca_weight: float | None = None,
                a_pdc: np.ndarray | None = None) -> ScoreBatch:
        """Scores from the standardised summaries; contributions from the same terms, or, given
        ``a_pdc`` (and ``attribution="pdc"``), with the PCA term's decomposition in place of its
        squared residual (the score is unchanged by the attribution)."""
        w = self.pca_weight if pca_weight is None else pca_weight
        z_cs = np.clip((a_cs - self.cs_loc_) / self.cs_scale_, 0.0, None)
        z_pca = np.clip((a_pca - self.pca_loc_) / self.pca_scale_, 0.0, None)
        per = self._transform(z_cs + w * z_pca)
        contrib = per
        if a_pdc is not None and self.attribution == "pdc" and self.pdc_loc_ is not None:
            contrib = self._transform(z_cs + w * np.clip((a_pdc - self.pdc_loc_) / self.pdc_scale_, 0.0, None))
        return ScoreBatch(per.sum(axis=1), contrib, {"cs": z_cs.sum(axis=1), "pca": z_pca.sum(axis=1)})

    def _transform(self, z: np.ndarray) -> np.ndarray:
        return np.sqrt(z) if self.transform == "sqrt" else z

    def score(self, windows: WindowBatch) -> ScoreBatch:
        if not self.fitted:
            return self.cs.score(windows)
        v = np.asarray(windows.values, dtype=np.float64)
        if v.shape[0] == 0:
            return ScoreBatch(np.zeros(0), np.zeros((0, v.shape[-1])))
        self._check(v.shape[-1])
        return self._score_residual(v, *self._residuals(v))

    def _score_residual(self, v: np.ndarray, r: np.ndarray, e: np.ndarray, d: np.ndarray) -> ScoreBatch:
        a_cs, a_pca = self.summaries(r, e)
        return self.combine(a_cs, a_pca, a_pdc=self._tail_mean(d))

    def _check(self, n: int) -> None:
        if self.fitted and self.components_.shape[1] != n:
            raise ValueError(f"CalibratedCSScorer was fitted on {self.components_.shape[1]} features, "
                             f"got windows with {n}; fit it again on windows of these features")


def score_many(items: list[tuple["CalibratedCSScorer", np.ndarray]], chunk: int = 256,
               jump_start: dict[int, ScoreBatch | None] | None = None) -> list[ScoreBatch]:
    """The windows of many entities, each with its own :class:`CalibratedCSScorer` (fitted or not), scored
    with one reconstruction for all of them: ``items`` = [(scorer, values [b_i, T, N])], one T and N.

    What a window's score depends on is its own scorer's calibration and the reconstruction, and the
    reconstruction of a window does not depend on the windows solved with it (each stops on its own; the random
    draws are fixed by seed and T): so stacking entities changes no score beyond float rounding, while one
    solver call for a batch of many entities costs about what one entity's call cost (the per-iteration work is
    small matrix products, dominated by dispatch at batch 1). Scorers whose reconstruction options differ are
    solved in separate calls. Returns one ScoreBatch per item, in order. (Issue 16; the paper's method is
    unchanged: see :class:`CSScorer`.) ``jump_start``: item index -> None, filled with that item's jump-start
    score (:meth:`CSScorer.score_residual`, the uncalibrated score) from the same reconstruction, at no extra solve.
    """
    out: list[ScoreBatch | None] = [None] * len(items)
    by_options: dict[tuple, list[int]] = {}
    for i, (sc, v) in enumerate(items):
        if np.asarray(v).ndim != 3 or np.asarray(v).shape[1] < 2:
            raise ValueError(f"score_many: values must be [B, T >= 2, N], got {np.asarray(v).shape}")
        sc._check(np.asarray(v).shape[-1])
        key = tuple(sorted((k, str(x)) for k, x in sc.cs.options().items()))
        by_options.setdefault(key, []).append(i)
    for idx in by_options.values():
        lead = items[idx[0]][0].cs
        vals = [np.asarray(items[i][1], dtype=np.float64) for i in idx]
        own = [items[i][0].cs.bases(v) if lead.grouping == "fit" else None for i, v in zip(idx, vals)]
        v_all = np.concatenate(vals)
        if lead.grouping == "fit":  # each entity's fitted grouping: its own bases, stacked
            n = v_all.shape[-1]
            bases = None if all(b is None for b in own) else np.concatenate(
                [np.broadcast_to(np.eye(n), (v.shape[0], n, n)) if b is None else b for b, v in zip(own, vals)])
        else:
            bases = "own"  # computed per window from the window itself
        x_hat = np.empty_like(v_all)
        iters = np.zeros(v_all.shape[0])
        for s in range(0, v_all.shape[0], chunk):
            part = bases if isinstance(bases, str) or bases is None else bases[s: s + chunk]
            _, x_hat[s: s + chunk], res = lead.reconstruct(v_all[s: s + chunk], part)
            iters[s: s + chunk] = res.iterations
        at = 0
        for i, v in zip(idx, vals):
            sc, b = items[i][0], v.shape[0]
            xh, it = x_hat[at: at + b], iters[at: at + b]
            at += b
            if sc.fitted:
                out[i] = sc._score_residual(v, *sc._pca_terms(v, np.abs(v - xh)))
            else:
                out[i] = sc.cs.score_residual(v, xh, it)
            if jump_start is not None and i in jump_start:
                jump_start[i] = sc.cs.score_residual(v, xh, it)
    return out
