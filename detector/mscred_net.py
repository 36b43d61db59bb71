"""The MSCRED network (Zhang et al., "A Deep Neural Network for Unsupervised Anomaly Detection and
Diagnosis in Multivariate Time Series Data", AAAI 2019): its hyper-parameters, the ConvLSTM, the
temporal attention, the module and its loss. A leaf: it imports torch and nothing of osad's
detector (the scorer around it is :mod:`osad.detector.mscred`).

The model reconstructs the last of ``step`` multi-scale signature tensors (see core.signature)
from all ``step`` of them. Architecture (paper, section "MSCRED framework"), written from its
specification:

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

Differences from public ports, on purpose: any number of features N works (paddings and output
paddings are computed from N, see :func:`level_sizes`), the ConvLSTM runs over time (not over a
batch of the 5 steps), and windows of many entities run in one batch [B, step, S, N, N].
The last transposed convolution is linear (no SELU), so the reconstruction is not bounded below
at -1.76; the others use SELU as in the paper.

Example::

    >>> import torch
    >>> y = MSCRED(MSCREDConfig(n_features=6)).eval()(torch.rand(2, 5, 3, 6, 6))
    >>> tuple(y.shape)
    (2, 3, 6, 6)
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from osad.core.signature import DEFAULT_SCALES, DEFAULT_STEP


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


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on ``device`` when ``amp``, else autocast explicitly off."""
    if amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
