"""MSCRED: Multi-Scale Convolutional Recurrent Encoder-Decoder (Zhang et al., "A Deep Neural Network
for Unsupervised Anomaly Detection and Diagnosis in Multivariate Time Series Data", AAAI 2019).

The model reconstructs the last of ``step`` multi-scale signature tensors (see core.signature)
from all ``step`` of them; a window whose reconstruction is poor is anomalous, and the rows of
the residual that are poorly reconstructed name the features that explain it.

Architecture (paper, section "MSCRED framework"), written from its specification:

* Encoder, applied to every time step (SELU activations):
  conv 3x3 stride 1 -> 32 ch, conv 3x3 stride 2 -> 64, conv 2x2 stride 2 -> 128,
  conv 2x2 stride 2 -> 256.
* Temporal part, per level: a ConvLSTM (Shi et al., NeurIPS 2015; kernel 3x3, hidden = the
  level's channels, with the peephole terms W_c o C of the paper's eq. 3) runs *over time*
  across the ``step`` feature maps. The level's output is an attention-weighted sum of its
  hidden states, weight_k = softmax_k(<H_k, H_last> / chi), chi = 5 (paper eq. 4).
* Decoder: transposed convolutions back up, each concatenated with the attended map of the
  level below: 256 -> 128, concat -> 256 -> 64, concat -> 128 -> 32, concat -> 64 -> S.
* Loss: squared reconstruction error of the last signature tensor (paper eq. 5).
* Score: residual R = M - M_hat of the last step; the number of "broken" elements
  |R_ij|^2 > theta on the smallest scale (paper section "Anomaly score"; reference
  theta = 0.005), or the sum of squared residuals on that scale (continuous; see
  :data:`SCORE_KINDS`). Diagnosis: features ranked by the row sums of the broken mask (or of the
  squared residuals); severity by which scales break.

Which score ranks better was measured (``bench/mscred_scores.py``, models trained 8 epochs on at
most 600 windows per entity, point-wise best F1 / AUPRC): SMD machine-1-6, 2-1, 3-3: sum of
squares 0.52 / 0.45, broken count 0.48 / 0.42; ASD omi-1..4: 0.22 / 0.13 against 0.27 / 0.14
(one entity, omi-2, gives 0.22 against 0.48); over all seven, F1 0.35 against 0.36 and AUPRC
0.265 against 0.264. Neither wins clearly; the default is the sum of squares (``"sse"``): it
does not depend on theta (whose meaning shifts with how well a model fits) and has no ties, so
quantile thresholds work on it. Both are computed for every window (``detail``) and both are
calibrated in checkpoints; ``score_kind="broken"`` selects the paper's.

Differences from public ports, on purpose: any number of features N works (paddings and output
paddings are computed from N, see :func:`level_sizes`), the ConvLSTM runs over time (not over a
batch of the 5 steps), and windows of many entities are scored in one batch [B, step, S, N, N].
The last transposed convolution is linear (no SELU), so the reconstruction is not bounded below
at -1.76; the others use SELU as in the paper.

Example::

    >>> import numpy as np
    >>> from detector.base import WindowBatch
    >>> rng = np.random.default_rng(0)
    >>> x = rng.random((8, 5, 3, 6, 6), dtype=np.float32)
    >>> batch = WindowBatch(signatures=x, values=np.zeros((8, 60, 6), np.float32))
    >>> scorer = MSCREDScorer(features=[f"f{i}" for i in range(6)], device="cpu")
    >>> out = scorer.fit(batch, epochs=1, progress=False).score(batch)
    >>> out.scores.shape, out.contributions.shape
    ((8,), (8, 6))
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osad.core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, Ranges
from osad.detector.base import ScoreBatch, Scorer, WindowBatch

#: Score kinds: "sse" = sum of squared residuals on the smallest scale (continuous; default),
#: "broken" = number of elements with |R_ij|^2 > theta on the smallest scale (the paper's score).
#: Measured side by side in the module docstring.
SCORE_KINDS = ("sse", "broken")
DEFAULT_THETA = 0.005
DEFAULT_BETA = 1.5


def level_sizes(n: int) -> tuple[int, int, int, int]:
    """Spatial sizes of the four encoder levels for N features.

    conv 3x3/s1 keeps N; conv 3x3/s2 (padding 1) gives ceil(N/2); the two 2x2/s2 convs pad one
    row and column at the bottom/right when their input is odd (TensorFlow's "SAME"), giving
    ceil(n/2) each. The decoder crops its transposed convolutions back to exactly these sizes.
    """
    if n < 1:
        raise ValueError(f"MSCRED needs at least one feature, got N = {n}")
    n2 = (n + 1) // 2
    n3 = (n2 + 1) // 2
    n4 = (n3 + 1) // 2
    return n, n2, n3, n4


@dataclass(frozen=True)
class MSCREDConfig:
    """Hyper-parameters that fix the network's shape (stored in checkpoints)."""

    n_features: int
    n_scales: int = len(DEFAULT_SCALES)
    step: int = DEFAULT_STEP
    channels: tuple[int, int, int, int] = (32, 64, 128, 256)
    chi: float = 5.0
    peephole: bool = True

    def __post_init__(self):
        if self.n_features < 1 or self.n_scales < 1 or self.step < 1:
            raise ValueError(f"MSCREDConfig: n_features, n_scales and step must be >= 1, got {self}")
        if len(self.channels) != 4:
            raise ValueError("MSCREDConfig: channels needs four levels, e.g. (32, 64, 128, 256)")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MSCREDConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MSCRED hyper-parameters {sorted(unknown)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


class ConvLSTM(nn.Module):
    """Convolutional LSTM with peepholes (Shi et al. 2015; MSCRED eq. 3), run over time.

    Input [B, T, C, H, W] -> the T hidden states, each [B, C, H, W]. Per step::

        i = sigma(W_xi * X_t + W_hi * H_{t-1} + W_ci o C_{t-1} + b_i)
        f = sigma(W_xf * X_t + W_hf * H_{t-1} + W_cf o C_{t-1} + b_f)
        C_t = f o C_{t-1} + i o tanh(W_xc * X_t + W_hc * H_{t-1} + b_c)
        o = sigma(W_xo * X_t + W_ho * H_{t-1} + W_co o C_t + b_o)
        H_t = o o tanh(C_t)

    Two equivalent ways to compute the gate pre-activations (same parameters, same result):

    * ``fused`` (default): per step one convolution of [X_t, H_{t-1}] (channels concatenated)
      with [W_x, W_h]: twice the reduction depth per convolution, which oneDNN runs closer to
      the machine's peak than two thin ones, and no separate pass to add their outputs;
    * ``split``: W_x * X_t for all T steps as one batched convolution, then W_h * H_{t-1} per
      step, added.

    Both skip W_h * H_{t-1} at t = 0, where H = C = 0.
    """

    def __init__(self, channels: int, size: int, peephole: bool = True, mode: str = "fused"):
        super().__init__()
        c = channels
        self.channels = c
        self.wx = nn.Conv2d(c, 4 * c, 3, padding=1, bias=True)
        self.wh = nn.Conv2d(c, 4 * c, 3, padding=1, bias=False)
        self.peephole = peephole
        if peephole:
            self.wc = nn.Parameter(torch.zeros(3, c, size, size))  # input, forget, output peepholes
        else:
            self.register_parameter("wc", None)
        if mode not in ("fused", "split"):
            raise ValueError(f"ConvLSTM mode must be 'fused' or 'split', got {mode!r}")
        self.mode = mode
        self._w_cache: tuple | None = None

    def _w_cat(self) -> torch.Tensor:
        """[W_x, W_h] along input channels; cached while the weights are unchanged and no gradient is needed."""
        wx, wh = self.wx.weight, self.wh.weight
        fmt = torch.channels_last if wx.is_contiguous(memory_format=torch.channels_last) and not wx.is_contiguous() \
            else torch.contiguous_format
        if torch.is_grad_enabled():
            return torch.cat([wx, wh], 1).contiguous(memory_format=fmt)
        key = (wx.data_ptr(), wh.data_ptr(), wx._version, wh._version, fmt)
        if self._w_cache is None or self._w_cache[0] != key:
            self._w_cache = (key, torch.cat([wx, wh], 1).contiguous(memory_format=fmt))
        return self._w_cache[1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, t = x.shape[:2]
        wc = self.wc.to(x.dtype) if self.wc is not None else None
        hs = []
        if self.mode == "fused":
            h, c = _lstm_cell(self.wx(x[:, 0]), None, wc)
            hs.append(h)
            if t > 1:
                w = self._w_cat()
                for k in range(1, t):
                    g = F.conv2d(torch.cat([x[:, k], h], 1), w, self.wx.bias, padding=1)
                    h, c = _lstm_cell(g, c, wc)
                    hs.append(h)
            return hs
        gx = self.wx(x.flatten(0, 1))
        gx = gx.view(b, t, *gx.shape[1:])
        h = c = None
        for k in range(t):
            if h is None:
                g = gx[:, k]
            else:
                g = self.wh(h)
                g = g.add_(gx[:, k]) if not torch.is_grad_enabled() else g + gx[:, k]
            h, c = _lstm_cell(g, c, wc)
            hs.append(h)
        return hs


def _lstm_cell(g: torch.Tensor, c: torch.Tensor | None, wc: torch.Tensor | None):
    """One ConvLSTM update from the gate pre-activations g [B, 4C, H, W] (order i, f, o, u).

    Returns (H_t [B, C, H, W], C_t); C_t is kept in the cell's own arrangement (see below) and
    only ever passed back to this function.

    Written with fused multiply-adds (addcmul) and, when no gradient is needed, in-place
    updates: the gates are memory-bound, so fewer passes over them is what makes them fast.
    With channels-last gates the arithmetic runs on the [B, H, W, 4C] view, where each gate is
    a run of C contiguous values per pixel: results then come out in the same order as their
    inputs and the loops vectorise (tanh of a channel slice taken in [B, C, H, W] order was
    measured 6x slower, 10.4 vs 1.8 ms at batch 64, N = 38).
    """
    nhwc = not g.is_contiguous() and g.is_contiguous(memory_format=torch.channels_last)
    if nhwc:
        g = g.permute(0, 2, 3, 1)
        if wc is not None:
            wc = wc.permute(0, 2, 3, 1)
    gi, gf, go, gu = g.chunk(4, dim=-1 if nhwc else 1)
    if wc is not None and wc.dtype != g.dtype:  # under autocast the gates come out in half precision
        wc = wc.to(g.dtype)
    h, c = _lstm_gates(gi, gf, go, gu, c, wc)
    return (h.permute(0, 3, 1, 2) if nhwc else h), c


def _lstm_gates(gi, gf, go, gu, c, wc):
    """The LSTM arithmetic on four same-shaped gate tensors (any arrangement, wc matching)."""
    if c is None:  # C_{t-1} = 0: the forget gate and the input/forget peepholes drop out
        c = torch.sigmoid(gi) * torch.tanh(gu)
    elif not torch.is_grad_enabled():
        if wc is not None:
            gi = torch.addcmul(gi, wc[0], c)
            gf = torch.addcmul(gf, wc[1], c)
        c = torch.addcmul(torch.sigmoid(gf).mul_(c), torch.sigmoid(gi), torch.tanh(gu))
    else:
        if wc is not None:
            gi = torch.addcmul(gi, wc[0], c)
            gf = torch.addcmul(gf, wc[1], c)
        c = torch.addcmul(torch.sigmoid(gf) * c, torch.sigmoid(gi), torch.tanh(gu))
    if wc is not None:
        go = torch.addcmul(go, wc[2], c)
    if not torch.is_grad_enabled():
        return torch.sigmoid(go).mul_(torch.tanh(c)), c
    return torch.sigmoid(go) * torch.tanh(c), c


def _flat(h: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*H*W] in memory order (a view for contiguous and channels-last maps)."""
    if h.is_contiguous():
        return h.view(h.shape[0], -1)
    if h.is_contiguous(memory_format=torch.channels_last):
        return h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
    return h.reshape(h.shape[0], -1)


def attend(hs: list[torch.Tensor], chi: float) -> torch.Tensor:
    """Temporal attention (MSCRED eq. 4): sum_k softmax_k(<H_k, H_last> / chi) H_k.

    ``hs``: the T hidden states, each [B, C, H, W] -> [B, C, H, W]. Logits are computed in
    float32 even under autocast: inner products of large maps overflow half precision.
    """
    with torch.autocast(hs[-1].device.type, enabled=False):
        last = _flat(hs[-1]).float().unsqueeze(2)
        logits = torch.stack([torch.bmm(_flat(h).float().unsqueeze(1), last).view(-1) for h in hs], 1)
        w = torch.softmax(logits / chi, dim=1).to(hs[-1].dtype)  # [B, T]
    out = hs[-1] * w[:, -1, None, None, None]
    for k in range(len(hs) - 1):
        out = out.addcmul_(hs[k], w[:, k, None, None, None])
    return out


class MSCRED(nn.Module):
    """The network: [B, step, S, N, N] signature windows -> [B, S, N, N] reconstruction of the last."""

    def __init__(self, cfg: MSCREDConfig):
        super().__init__()
        self.cfg = cfg
        n1, n2, n3, n4 = self.sizes = level_sizes(cfg.n_features)
        c1, c2, c3, c4 = cfg.channels
        s = cfg.n_scales
        self.conv1 = nn.Conv2d(s, c1, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 2, stride=2)
        self.conv4 = nn.Conv2d(c3, c4, 2, stride=2)
        self.lstm1 = ConvLSTM(c1, n1, cfg.peephole)
        self.lstm2 = ConvLSTM(c2, n2, cfg.peephole)
        self.lstm3 = ConvLSTM(c3, n3, cfg.peephole)
        self.lstm4 = ConvLSTM(c4, n4, cfg.peephole)
        self.deconv4 = nn.ConvTranspose2d(c4, c3, 2, stride=2)  # n4 -> 2 n4, cropped to n3
        self.deconv3 = nn.ConvTranspose2d(2 * c3, c2, 2, stride=2)  # n3 -> 2 n3, cropped to n2
        # 3x3/s2/p1 gives 2 n2 - 1 + output_padding: output_padding 1 when N is even.
        self.deconv2 = nn.ConvTranspose2d(2 * c2, c1, 3, stride=2, padding=1, output_padding=(n1 + 1) % 2)
        self.deconv1 = nn.ConvTranspose2d(2 * c1, s, 3, stride=1, padding=1)

    def use_channels_last(self, enabled: bool = True, min_size: int = 8) -> "MSCRED":
        """Put the weights in NHWC (channels-last) layout, except ConvLSTMs whose maps are smaller
        than ``min_size`` (oneDNN's NHWC kernels lose to NCHW on tiny maps such as 5 x 5).

        Measured on this project's 2-core Xeon (AVX-512), N = 38, batch 64, one thread:
        all NCHW 113, all NHWC 112, NHWC except the 5 x 5 level 125 GFLOP per CPU-second.
        The numbers the model computes are the same (up to float rounding order).
        """
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        if enabled:
            for lstm, size in zip((self.lstm1, self.lstm2, self.lstm3, self.lstm4), self.sizes):
                if size < min_size:
                    lstm.to(memory_format=torch.contiguous_format)
        return self

    @staticmethod
    def _to(lstm: "ConvLSTM", e: torch.Tensor) -> torch.Tensor:
        """``e`` in the memory layout of ``lstm``'s weights (each level may use its own)."""
        w = lstm.wx.weight
        if w.is_contiguous():
            return e.contiguous()
        return e.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def _pad_odd(x: torch.Tensor) -> torch.Tensor:
        """Pad one row/column at the bottom/right when the map is odd ("SAME" for 2x2/s2)."""
        p = x.shape[-1] % 2
        return F.pad(x, (0, p, 0, p)) if p else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.dim() != 5 or tuple(x.shape[1:]) != (cfg.step, cfg.n_scales, cfg.n_features, cfg.n_features):
            raise ValueError(
                f"MSCRED expects windows [B, {cfg.step}, {cfg.n_scales}, {cfg.n_features}, {cfg.n_features}], "
                f"got {list(x.shape)}")
        b, t = x.shape[:2]
        n1, n2, n3, n4 = self.sizes
        z = x.flatten(0, 1)  # every time step through the same encoder, as one batch
        ip = not torch.is_grad_enabled()  # in place when no gradient is needed: one pass less
        e1 = F.selu(self.conv1(z), inplace=ip)
        e2 = F.selu(self.conv2(e1), inplace=ip)
        e3 = F.selu(self.conv3(self._pad_odd(e2)), inplace=ip)
        e4 = F.selu(self.conv4(self._pad_odd(e3)), inplace=ip)
        chi = cfg.chi
        a1, a2, a3, a4 = (attend(lstm(self._to(lstm, e).view(b, t, *e.shape[1:])), chi)
                          for lstm, e in ((self.lstm1, e1), (self.lstm2, e2), (self.lstm3, e3), (self.lstm4, e4)))
        d4 = F.selu(self.deconv4(a4), inplace=ip)[:, :, :n3, :n3]
        d3 = F.selu(self.deconv3(torch.cat([d4, a3], 1)), inplace=ip)[:, :, :n2, :n2]
        d2 = F.selu(self.deconv2(torch.cat([d3, a2], 1)), inplace=ip)
        return self.deconv1(torch.cat([d2, a1], 1))


def reconstruction_loss(model: MSCRED, x: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the reconstruction and the last signature tensor (paper eq. 5)."""
    out = model(x)
    return F.mse_loss(out.float(), x[:, -1].float())


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes (in name order): identifies a trained model."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        if t.numel():  # bytes in logical (row-major) order, whatever the memory layout
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pick_device(device: "str | torch.device | None" = None) -> torch.device:
    """``None``/"auto": CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        d = device
    else:
        try:
            d = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device {device!r} is not a torch device ({e}); use auto, cpu, cuda or cuda:N") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                         "use --device cpu")
    return d


def default_threads() -> int:
    """Threads for CPU work: ``OMP_NUM_THREADS`` when set, else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ScoreStats:
    """Statistics of a score on normal validation windows, for threshold calibration."""

    n: int
    max: float
    mean: float
    std: float
    q50: float
    q90: float
    q95: float
    q99: float
    q999: float

    @classmethod
    def of(cls, s: np.ndarray) -> "ScoreStats":
        s = np.asarray(s, np.float64)
        if s.size == 0:
            return cls(0, *([math.nan] * 8))
        q = np.quantile(s, [0.5, 0.9, 0.95, 0.99, 0.999])
        return cls(int(s.size), float(s.max()), float(s.mean()), float(s.std()), *map(float, q))


@dataclass
class Calibration:
    """Validation score statistics per score kind, and the reference threshold beta * max."""

    stats: dict[str, ScoreStats] = field(default_factory=dict)
    beta: float = DEFAULT_BETA

    def threshold(self, kind: str) -> float | None:
        st = self.stats.get(kind)
        if st is None or st.n == 0:
            return None
        return float(self.beta * st.max)

    def to_dict(self) -> dict:
        return {"beta": self.beta, "stats": {k: asdict(v) for k, v in self.stats.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls({k: ScoreStats(**v) for k, v in d.get("stats", {}).items()}, float(d.get("beta", DEFAULT_BETA)))


class MSCREDScorer(Scorer):
    """MSCRED behind the :class:`~detector.base.Scorer` interface.

    Construct empty and :meth:`fit` on normal windows, or load a trained one with
    :meth:`from_checkpoint`. :meth:`score` returns one score per window, per-feature
    contributions [B, N] and ``detail`` = broken-element counts per scale (``broken_w10``, ...)
    plus ``sse`` and ``broken`` (both score kinds), for severity and diagnosis.

    ``features``, ``scales``, ``gap``, ``step`` and ``ranges`` describe the windows the model
    was trained on; :meth:`check_window` tells whether an incoming window matches them.
    """

    needs_fit = True

    def __init__(self, features=None, *, scales=DEFAULT_SCALES, gap: int = DEFAULT_GAP, step: int = DEFAULT_STEP,
                 ranges: Ranges | None = None, config: MSCREDConfig | None = None, score_kind: str = "sse",
                 theta: float = DEFAULT_THETA, beta: float = DEFAULT_BETA, device: str | None = None,
                 amp: bool = False, threads: int | None = None, batch_size: int = 256, channels_last: bool = True,
                 slice_batches: bool = True):
        if score_kind not in SCORE_KINDS:
            raise ValueError(f"score_kind must be one of {SCORE_KINDS}, got {score_kind!r}")
        self.features = list(features) if features is not None else (list(ranges.features) if ranges else None)
        self.scales = tuple(int(s) for s in scales)
        self.gap = int(gap)
        self.step = int(step)
        self.ranges = ranges
        self.config = config
        self.score_kind = score_kind
        self.theta = float(theta)
        self.calibration = Calibration(beta=float(beta))
        self.device = pick_device(device)
        self.amp = bool(amp)
        self.batch_size = int(batch_size)
        # NHWC (channels-last) layout for the levels with larger maps: faster oneDNN convolutions
        # (see MSCRED.use_channels_last and docs/benchmarks.md); numerically the same model.
        self.channels_last = bool(channels_last)
        self.train_info: dict = {}
        self.threads = int(threads) if threads else default_threads()
        #: CPU batches of at least ``2 * threads`` windows are scored as ``threads`` slices in parallel
        #: (one core each) instead of with ``threads`` OpenMP threads per operation; see :meth:`_forward`.
        self.slice_batches = bool(slice_batches)
        self._pool = None
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        self.model: MSCRED | None = None
        self._model_id: str | None = None
        if config is not None:
            self._build(config)

    # ----------------------------------------------------------------------------- state
    def _build(self, cfg: MSCREDConfig) -> None:
        if cfg.step != self.step or cfg.n_scales != len(self.scales):
            raise ValueError(f"model config (step {cfg.step}, {cfg.n_scales} scales) does not match the scorer's "
                             f"windows (step {self.step}, scales {list(self.scales)})")
        self.config = cfg
        self.model = MSCRED(cfg).to(self.device).eval()
        if self.channels_last:
            self.model.use_channels_last()
        self._model_id = None

    @property
    def model_id(self) -> str:
        if self.model is None:
            return "mscred:untrained"
        if self._model_id is None:
            self._model_id = "mscred:" + weights_hash(self.model.state_dict())[:12]
        return self._model_id

    @property
    def threshold(self) -> float | None:
        """Reference threshold beta * max(validation score) for the current score kind."""
        return self.calibration.threshold(self.score_kind)

    @property
    def scale_index(self) -> int:
        """Channel of the smallest scale (the one the score is computed on)."""
        return int(np.argmin(self.scales))

    # ----------------------------------------------------------------------------- matching
    def check_window(self, features, scales=None, gap=None, step=None, scaling_id: str | None = None) -> None:
        """Raise ValueError, saying what differs and what to do, if a window does not fit this model."""
        if self.features is not None and list(features) != list(self.features):
            missing = [f for f in self.features if f not in set(features)]
            extra = [f for f in features if f not in set(self.features)]
            raise ValueError(
                f"model {self.model_id} was trained for features {list(self.features)} but the window has "
                f"{list(features)} (missing {missing}, unexpected {extra}, or another order); retrain with "
                "'osad train' on data with these features")
        if scales is not None and tuple(scales) != self.scales:
            raise ValueError(f"model {self.model_id} was trained on scales {list(self.scales)} but the window has "
                             f"{list(scales)}; run the featurizer with --scales {','.join(map(str, self.scales))}")
        if gap is not None and int(gap) != self.gap:
            raise ValueError(f"model {self.model_id} was trained with gap {self.gap} but the window has gap {gap}; "
                             f"run the featurizer with --gap {self.gap}")
        if step is not None and int(step) != self.step:
            raise ValueError(f"model {self.model_id} was trained on {self.step} steps but the window has {step}")
        if scaling_id and self.ranges is not None and scaling_id != self.ranges.scaling_id:
            raise ValueError(f"model {self.model_id} was trained on scaling ranges {self.ranges.scaling_id} but the "
                             f"window was scaled with {scaling_id}; give the featurizer the model's ranges")

    def _check_batch(self, windows: WindowBatch) -> np.ndarray:
        sig = np.asarray(windows.signatures)
        if sig.ndim != 5 or sig.shape[3] != sig.shape[4]:
            raise ValueError(f"signatures must be [B, step, S, N, N], got {list(sig.shape)}")
        if self.config is not None:
            c = self.config
            if tuple(sig.shape[1:]) != (c.step, c.n_scales, c.n_features, c.n_features):
                raise ValueError(
                    f"model {self.model_id} takes windows [B, {c.step}, {c.n_scales}, {c.n_features}, "
                    f"{c.n_features}] ({c.n_features} features {self.features}), got {list(sig.shape)}")
        elif sig.shape[1] != self.step or sig.shape[2] != len(self.scales):
            raise ValueError(f"windows have {sig.shape[1]} steps and {sig.shape[2]} scales; this scorer was set up "
                             f"for step {self.step} and scales {list(self.scales)}")
        return sig

    # ----------------------------------------------------------------------------- fit
    def fit(self, windows: WindowBatch, val: WindowBatch | None = None, **train_options) -> "MSCREDScorer":
        """Train on normal windows (in time order); calibrate on ``val`` or a held-out tail.

        ``train_options`` go to :class:`detector.train.TrainConfig` (epochs, batch_size, patience,
        val_fraction, lr, seed, progress, ...).
        """
        from osad.detector.train import TrainConfig, fit_scorer

        sig = self._check_batch(windows)
        if self.features is None:
            self.features = [f"f{i + 1:02d}" for i in range(sig.shape[-1])]
        if len(self.features) != sig.shape[-1]:
            raise ValueError(f"{len(self.features)} feature names for windows of {sig.shape[-1]} features")
        if self.model is None:
            self._build(MSCREDConfig(n_features=sig.shape[-1], n_scales=sig.shape[2], step=sig.shape[1]))
        val_sig = None if val is None else self._check_batch(val)
        train_options.setdefault("amp", self.amp)
        fit_scorer(self, sig, val_sig, TrainConfig(**train_options))
        self._model_id = None
        return self

    # ----------------------------------------------------------------------------- score
    def _autocast(self):
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def residuals(self, signatures: np.ndarray) -> np.ndarray:
        """Squared residuals (M - M_hat)^2 of the last step, [B, S, N, N] float32."""
        if self.model is None:
            raise RuntimeError("MSCREDScorer has no model: fit it or load a checkpoint first")
        sig = np.ascontiguousarray(signatures, dtype=np.float32)
        self.model.eval()
        out = np.empty((sig.shape[0], *sig.shape[2:]), np.float32)
        for i in range(0, sig.shape[0], self.batch_size):
            x = torch.from_numpy(sig[i:i + self.batch_size]).to(self.device, non_blocking=True)
            rec = self._forward(x)
            r = (x[:, -1] - rec.float()) ** 2
            out[i:i + len(x)] = r.cpu().numpy()
        return out

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():  # both are per-thread settings
            return self.model(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a batch. On CPU, a batch of at least ``2 * threads`` windows is cut into
        ``threads`` slices run at once on a thread pool with one OpenMP thread each (torch's
        thread count is process-wide: it is set to 1 for the call and restored after).

        Why: most of MSCRED's operations are small (maps of 5 x 5 to 38 x 38, elementwise gate
        arithmetic), and OpenMP's fork/join per operation scales them poorly; independent slices
        scale almost linearly. Measured in one process at batch 64, N = 38, 2 cores: see
        bench/detector.py (rows "intra-op threads" and "sliced batch") and docs/benchmarks.md.
        """
        t = self.threads
        if self.device.type != "cpu" or not self.slice_batches or t < 2 or len(x) < 2 * t:
            return self._forward_one(x)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(t, thread_name_prefix="mscred")
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.cat(list(self._pool.map(self._forward_one, x.tensor_split(t))))
        finally:
            torch.set_num_threads(prev)

    def score(self, windows: WindowBatch) -> ScoreBatch:
        sig = self._check_batch(windows)
        if sig.shape[0] == 0:
            n = sig.shape[-1]
            return ScoreBatch(np.zeros(0), np.zeros((0, n)), {})
        r2 = self.residuals(sig)
        return self.score_residuals(r2)

    def score_residuals(self, r2: np.ndarray) -> ScoreBatch:
        """Scores, contributions and detail from squared residuals [B, S, N, N]."""
        s0 = self.scale_index
        broken = r2 > self.theta
        counts = broken.sum(axis=(2, 3))  # [B, S]
        sse = r2[:, s0].sum(axis=(1, 2), dtype=np.float64)
        detail = {f"broken_w{w}": counts[:, k].astype(np.float64) for k, w in enumerate(self.scales)}
        detail["broken"] = counts[:, s0].astype(np.float64)
        detail["sse"] = sse
        if self.score_kind == "broken":
            scores = detail["broken"]
            contrib = broken[:, s0].sum(axis=2, dtype=np.float64)
        else:
            scores = sse
            contrib = r2[:, s0].sum(axis=2, dtype=np.float64)
        return ScoreBatch(scores=np.asarray(scores, np.float64), contributions=contrib, detail=detail)

    # ----------------------------------------------------------------------------- checkpoints
    def save(self, path) -> str:
        """Write a safetensors checkpoint (see detector.checkpoint). Returns its content hash."""
        from osad.detector.checkpoint import save_checkpoint

        return save_checkpoint(self, path)

    @classmethod
    def from_checkpoint(cls, path, *, device: str | None = None, amp: bool = False, score_kind: str | None = None,
                        threads: int | None = None, batch_size: int = 256) -> "MSCREDScorer":
        """Load a checkpoint written by ``osad train`` (weights and metadata verified)."""
        from osad.detector.checkpoint import load_checkpoint

        return load_checkpoint(path, device=device, amp=amp, score_kind=score_kind, threads=threads,
                               batch_size=batch_size)

    def severity(self, detail: dict[str, np.ndarray], index: int) -> str:
        """Paper's severity from which scales break: only the smallest -> short, up to the middle ->
        medium, the largest too -> long; "" if none breaks."""
        broke = [detail[f"broken_w{w}"][index] > 0 for w in sorted(self.scales)]
        if not any(broke):
            return ""
        if len(broke) > 1 and broke[-1]:
            return "long"
        return "medium" if any(broke[1:]) else "short"
