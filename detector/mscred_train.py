"""The MSCRED training loop: Adam on the reconstruction loss, early stopping, the best epoch kept.

What to train on and the settings are :mod:`osad.detector.train`; the scorer that calls this and
calibrates its score afterwards is :meth:`osad.detector.mscred.MSCREDScorer.fit`.
"""

from __future__ import annotations

import copy
import math
import sys
import time

import numpy as np
import torch

from .mscred_net import MSCRED, autocast, reconstruction_loss
from .train import TrainConfig


def say(cfg: TrainConfig, msg: str) -> None:
    """Progress on stderr, unless ``cfg.progress`` is off."""
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


@torch.inference_mode()
def evaluate_loss(model: MSCRED, data: torch.Tensor, device, amp: bool, batch_size: int = 128) -> float:
    """Mean squared reconstruction error of the last step over ``data`` (a CPU tensor)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size].to(device, non_blocking=True)
        with autocast(device, amp):
            total += float(reconstruction_loss(model, x)) * len(x)
        n += len(x)
    return total / max(n, 1)


def _adam(model: MSCRED, lr: float) -> torch.optim.Optimizer:
    """Adam (the paper's optimiser); the fused kernel where this torch has one for the device
    (5x faster updates of the 7M parameters on CPU, same arithmetic)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def train_model(model: MSCRED, train: np.ndarray, val: np.ndarray, cfg: TrainConfig, device: torch.device) -> dict:
    """Adam on the reconstruction loss with early stopping; leaves the best epoch's weights in ``model``.

    Returns the history: per epoch loss, val_loss, windows/s, seconds; best_epoch; stopped_early.
    """
    if len(train) == 0:
        raise ValueError("no training windows; give more data (or a smaller --val-fraction)")
    xs = torch.from_numpy(np.ascontiguousarray(train, np.float32))
    xv = torch.from_numpy(np.ascontiguousarray(val, np.float32)) if len(val) else None
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _adam(model, cfg.lr)
    best, best_state, best_epoch, bad = math.inf, None, 0, 0
    history = []
    tty = cfg.progress and sys.stderr.isatty()
    stopped_early = False
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xs), generator=gen)
        total = 0.0
        for i in range(0, len(xs), cfg.batch_size):
            x = xs[perm[i:i + cfg.batch_size]].to(device, non_blocking=True)
            with autocast(device, cfg.amp):
                loss = reconstruction_loss(model, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            if tty:
                done = min(i + cfg.batch_size, len(xs))
                rate = done / max(time.perf_counter() - t0, 1e-9)
                print(f"\repoch {epoch}/{cfg.epochs} {done}/{len(xs)} windows, loss {total / done:.3e}, "
                      f"{rate:.1f} windows/s", end="", file=sys.stderr, flush=True)
        train_s = time.perf_counter() - t0
        loss = total / len(xs)
        val_loss = evaluate_loss(model, xv, device, cfg.amp) if xv is not None else loss
        rate = len(xs) / train_s
        improved = val_loss < best * (1 - cfg.min_delta)
        if improved:
            best, best_epoch, bad = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        history.append({"epoch": epoch, "loss": loss, "val_loss": val_loss, "windows_per_s": rate,
                        "seconds": time.perf_counter() - t0})
        say(cfg, f"{chr(13) if tty else ''}epoch {epoch}/{cfg.epochs}: loss {loss:.4e}  val_loss {val_loss:.4e}"
                 f"{'  (best)' if improved else f'  (no improvement {bad}/{cfg.patience})'}  {rate:.1f} windows/s  "
                 f"{time.perf_counter() - t0:.1f} s")
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {loss}); try a smaller --lr")
        if bad >= cfg.patience:
            stopped_early = epoch < cfg.epochs
            say(cfg, f"early stop: validation loss has not improved for {cfg.patience} epochs; "
                     f"keeping epoch {best_epoch}")
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"history": history, "best_epoch": best_epoch, "best_val_loss": best, "stopped_early": stopped_early}
