"""MSCRED behind the scorer interface (Zhang et al., "A Deep Neural Network for Unsupervised Anomaly
Detection and Diagnosis in Multivariate Time Series Data", AAAI 2019).

The network reconstructs the last of ``step`` multi-scale signature tensors from all ``step`` of
them (:mod:`osad.detector.mscred_net`); a window whose reconstruction is poor is anomalous, and
the rows of the residual that are poorly reconstructed name the features that explain it. This
module is the scorer around it: it scores, trains (the loop is :mod:`osad.detector.mscred_train`)
and calibrates, and assembles itself from a checkpoint's parts (:mod:`osad.detector.checkpoint`).

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

Example::

    >>> import numpy as np
    >>> from osad.detector.base import WindowBatch
    >>> rng = np.random.default_rng(0)
    >>> x = rng.random((8, 5, 3, 6, 6), dtype=np.float32)
    >>> batch = WindowBatch(signatures=x, values=np.zeros((8, 60, 6), np.float32))
    >>> scorer = MSCREDScorer(features=[f"f{i}" for i in range(6)], device="cpu")
    >>> out = scorer.fit(batch, epochs=1, progress=False).score(batch)
    >>> out.scores.shape, out.contributions.shape
    ((8,), (8, 6))
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from osad.core.signature import DEFAULT_GAP, DEFAULT_SCALES, DEFAULT_STEP, Ranges

from .base import ScoreBatch, Scorer, WindowBatch, WindowSpec
from .checkpoint import (CheckpointError, CheckpointParts, check_weights_fit, inconsistent, load_checkpoint,
                         save_checkpoint)
from .mscred_net import MSCRED, MSCREDConfig, autocast, pick_device, weights_hash
from .mscred_train import say, train_model
from .score_stats import DEFAULT_BETA, Calibration, ScoreStats
from .train import TrainConfig, TrainingWindows, overlap_windows, split_ends

#: Score kinds: "sse" = sum of squared residuals on the smallest scale (continuous; default),
#: "broken" = number of elements with |R_ij|^2 > theta on the smallest scale (the paper's score).
#: Measured side by side in the module docstring.
SCORE_KINDS = ("sse", "broken")
DEFAULT_THETA = 0.005


def default_threads() -> int:
    """Threads for CPU work: ``OMP_NUM_THREADS`` when set, else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class MSCREDScorer(Scorer):
    """MSCRED behind the :class:`~osad.detector.base.Scorer` interface.

    Construct empty and :meth:`fit` on normal windows, or load a trained one with
    :meth:`from_checkpoint`. :meth:`score` returns one score per window, per-feature
    contributions [B, N] and ``detail`` = broken-element counts per scale (``broken_w10``, ...)
    plus ``sse`` and ``broken`` (both score kinds), for severity and diagnosis.

    ``features``, ``scales``, ``gap``, ``step`` and ``ranges`` describe the windows the model
    was trained on (:attr:`window`, :attr:`scaling_id`); :meth:`check_window` tells whether an
    incoming window matches them. Its :attr:`threshold` is the calibrated ``beta * max`` of its
    score on validation windows.
    """

    needs_fit = True
    uses_signatures = True

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
        self._train_info: dict = {}
        self._threads_option = threads
        self.threads = int(threads) if threads else default_threads()
        #: CPU batches of at least ``2 * threads`` windows are scored as ``threads`` slices in parallel
        #: (one core each) instead of with ``threads`` OpenMP threads per operation; see :meth:`_forward`.
        self.slice_batches = bool(slice_batches)
        self._pool = None
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        self.model: MSCRED | None = None
        self._model_id: str | None = None
        self.checkpoint_path: str | None = None  # the file it was loaded from
        self.checkpoint_meta: dict | None = None  # that file's metadata document
        if config is not None:
            self._build(config)

    def options(self) -> dict[str, Any]:
        return dict(features=None if self.features is None else list(self.features), scales=self.scales,
                    gap=self.gap, step=self.step, ranges=self.ranges, config=self.config, score_kind=self.score_kind,
                    theta=self.theta, beta=self.calibration.beta, device=self.device, amp=self.amp,
                    threads=self._threads_option, batch_size=self.batch_size, channels_last=self.channels_last,
                    slice_batches=self.slice_batches)

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
    def window(self) -> WindowSpec:
        return WindowSpec(gap=self.gap, features=None if self.features is None else tuple(self.features),
                          scales=self.scales, step=self.step)

    @property
    def scaling_id(self) -> str | None:
        """The scaling of its ranges; without ranges (trained online on one entity's windows), the scaling
        its training windows had, if recorded; None: any."""
        if self.ranges is not None:
            return self.ranges.scaling_id
        return self._train_info.get("scaling_id") or None

    @property
    def train_info(self) -> dict:
        return self._train_info

    def annotate(self, **info) -> None:
        """Add to :attr:`train_info` (e.g. where the training windows came from); saved with the checkpoint."""
        self._train_info = {**self._train_info, **info}

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

        ``train_options`` are :class:`~osad.detector.train.TrainConfig`'s (epochs, batch_size,
        patience, val_fraction, lr, seed, progress, ...).
        """
        sig = self._check_batch(windows)
        if self.features is None:
            self.features = [f"f{i + 1:02d}" for i in range(sig.shape[-1])]
        if len(self.features) != sig.shape[-1]:
            raise ValueError(f"{len(self.features)} feature names for windows of {sig.shape[-1]} features")
        if self.model is None:
            self._build(MSCREDConfig(n_features=sig.shape[-1], n_scales=sig.shape[2], step=sig.shape[1]))
        val_sig = None if val is None else self._check_batch(val)
        train_options.setdefault("amp", self.amp)
        self._train(sig, val_sig, TrainConfig(**train_options))
        return self

    def fit_training_windows(self, data: TrainingWindows, config: TrainConfig) -> "MSCREDScorer":
        """Train on prepared windows (``osad train``): their features, scaling ranges and own validation
        windows; ``train_info["source"]`` records where they came from."""
        if len(data.train) == 0:
            raise ValueError(f"no training windows from {data.source.get('path')}; give more data or a smaller "
                             "--val-fraction")
        if self.model is None:
            self._build(MSCREDConfig(n_features=data.train.shape[-1], n_scales=data.train.shape[2],
                                     step=data.train.shape[1]))
        self.features = list(data.features)
        self.ranges = data.ranges
        self._train(data.train, data.val, config)
        self._train_info["source"] = data.source
        return self

    def _train(self, train: np.ndarray, val: np.ndarray | None, cfg: TrainConfig) -> None:
        """Train the model from a fresh, seeded initialisation and calibrate its scores.

        With ``val`` None, the last ``cfg.val_fraction`` of ``train`` (time-ordered windows of one
        series) is held out, minus the windows that overlap it.
        """
        if val is None:
            tr, va = split_ends(np.arange(len(train)), cfg.val_fraction,
                                overlap_windows(self.scales, self.gap, self.step))
            train, val = train[tr], train[va]
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self._build(self.config)  # fresh weights from the seed: fit is deterministic
        self.model.train()
        say(cfg, f"training MSCRED ({self.config.n_features} features, scales {list(self.scales)}, step "
                 f"{self.step}) on {len(train)} windows, validating on {len(val)}, device {self.device}"
                 f"{', bf16 autocast' if cfg.amp else ''}, {torch.get_num_threads()} threads")
        t0 = time.perf_counter()
        result = train_model(self.model, train, val, cfg, self.device)
        out = self.score_residuals(self.residuals(val if len(val) else train))
        self.calibration = Calibration({"sse": ScoreStats.of(out.detail["sse"]),
                                        "broken": ScoreStats.of(out.detail["broken"])}, beta=self.calibration.beta)
        self._train_info = {
            "config": asdict(cfg),
            "windows": {"train": int(len(train)), "val": int(len(val))},
            "calibrated_on": "validation" if len(val) else "training windows (no validation split)",
            "best_epoch": result["best_epoch"],
            "best_val_loss": result["best_val_loss"],
            "stopped_early": result["stopped_early"],
            "epochs": [{k: round(v, 6) if isinstance(v, float) else v for k, v in h.items()}
                       for h in result["history"]],
            "seconds": round(time.perf_counter() - t0, 3),
            "device": str(self.device),
        }
        self._model_id = None
        st = self.calibration.stats[self.score_kind]
        say(cfg, f"validation {self.score_kind} score: max {st.max:.4g}, mean {st.mean:.4g}, q99 {st.q99:.4g}; "
                 f"threshold {self.calibration.beta} * max = {self.threshold:.4g}")

    # ----------------------------------------------------------------------------- score
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
        with torch.inference_mode(), autocast(self.device, self.amp):  # both are per-thread settings
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
    def parts(self) -> CheckpointParts:
        """What a checkpoint of this scorer holds."""
        if self.model is None:
            raise CheckpointError("nothing to save: the MSCRED scorer has not been trained")
        return CheckpointParts(features=list(self.features), scales=self.scales, gap=self.gap, step=self.step,
                               ranges=self.ranges, config=self.config, score_kind=self.score_kind, theta=self.theta,
                               calibration=self.calibration, train_info=self._train_info,
                               weights=self.model.state_dict())

    def save(self, path) -> str:
        """Write a safetensors checkpoint (see :mod:`osad.detector.checkpoint`). Returns its content hash."""
        return save_checkpoint(self.parts(), path)

    @classmethod
    def from_checkpoint(cls, path, *, device: str | None = None, amp: bool = False, score_kind: str | None = None,
                        threads: int | None = None, batch_size: int = 256) -> "MSCREDScorer":
        """Load a checkpoint written by ``osad train`` (weights and metadata verified)."""
        parts = load_checkpoint(path)
        device = pick_device(device)  # its own error (no CUDA) is not the checkpoint's fault
        try:
            sc = cls(parts.features, scales=parts.scales, gap=parts.gap, step=parts.step, ranges=parts.ranges,
                     config=parts.config, score_kind=score_kind or parts.score_kind, theta=parts.theta,
                     beta=parts.calibration.beta, device=device, amp=amp, threads=threads, batch_size=batch_size)
        except (KeyError, TypeError, ValueError) as e:
            raise inconsistent(path, e) from None
        check_weights_fit(path, sc.model.state_dict(), parts.weights)
        with torch.no_grad():
            sc.model.load_state_dict(parts.weights, strict=True)
        sc.calibration = parts.calibration
        sc._train_info = parts.train_info
        sc.checkpoint_meta = parts.meta
        sc.checkpoint_path = str(path)
        return sc

    def severity(self, detail: dict[str, np.ndarray], index: int) -> str:
        """Paper's severity from which scales break: only the smallest -> short, up to the middle ->
        medium, the largest too -> long; "" if none breaks."""
        broke = [detail[f"broken_w{w}"][index] > 0 for w in sorted(self.scales)]
        if not any(broke):
            return ""
        if len(broke) > 1 and broke[-1]:
            return "long"
        return "medium" if any(broke[1:]) else "short"
