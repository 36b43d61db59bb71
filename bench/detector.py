"""MSCRED inference throughput and efficiency against this machine's own convolution speed, same run.

    .venv/bin/python bench/detector.py [--features 38] [--rounds 7] [--threads N] [--gpu] [--write-docs]

What it measures, interleaved round by round so a busy machine slows all figures alike:

* windows/s of ``MSCREDScorer.score`` (the detector's whole path: numpy batch -> model ->
  squared residuals -> scores, contributions, detail) at batch 1 and batch 64, CPU, float32;
* the model's FLOPs per window (torch.utils.flop_counter.FlopCounterMode; 2 FLOPs per
  multiply-add, convolutions and matrix products only);
* the machine's dense convolution throughput: one large conv2d (64 x 256 x 32 x 32, 3x3,
  256 -> 256), in both memory layouts, the faster one counted;
* efficiency = achieved GFLOP/s (FLOPs per window x windows/s) / measured conv GFLOP/s.

Medians over ``--rounds``. ``--gpu``: also windows/s on CUDA at batch 256 with bfloat16 autocast.
``--write-docs`` replaces the "## Detector (MSCRED)" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its file names would shadow the packages

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from osad.detector.base import WindowBatch  # noqa: E402
from osad.detector.mscred import MSCREDScorer  # noqa: E402
from osad.detector.mscred_net import MSCREDConfig  # noqa: E402

HEADING = "## Detector (MSCRED)"

# Written under the table by --write-docs: what was measured while optimising (profiles and A/B runs of
# the variants, same process, one thread, process CPU time so that other work on the machine counts less).
NOTES = """Reading it:
* Windows/s is the detector's whole scoring path (`MSCREDScorer.score`: numpy in; scores, per-feature
  contributions and per-scale broken counts out), float32 unless said. Efficiency compares the model's
  FLOPs per second with what one large, well-shaped conv2d reaches on the same cores in the same run.
  The model's FLOPs exclude work it skips (W_h * H_0 with H_0 = 0): a plain implementation that computes
  it does 4.7 GFLOP per window; counted that way the same windows/s would read about 10% higher.
* Batch 64 is scored as 2 slices of 32 on a thread pool, one OpenMP thread each (the default on CPU for
  batches of at least 2 x threads); the "intra-op threads only" row is the same model with every
  operation spread over both threads instead. Most of MSCRED's operations are small (5 x 5 to 38 x 38
  maps, elementwise gate arithmetic), and OpenMP's fork/join per operation scales them poorly, the more
  so when other processes hold the cores: in an earlier run at load average 2.6 the two read 36.3 and
  21.1 windows/s (81% and 47%).
* Where the time goes (profile, N = 38, batch 64, one thread): convolutions about 70%, the ConvLSTM
  gate arithmetic about 15-20%, attention 3%, SELU 2%; the convolutions run at about the reference
  conv2d's speed, so what is left is memory-bound elementwise work.
* What made it faster (A/B in one process, one thread, batch 64, GFLOP per CPU-second):
  - one convolution of [X_t, H_t-1] with [W_x; W_h] per step instead of W_x * X (all steps batched)
    plus W_h * H per step: 119 vs 101 (twice the reduction depth per call, no pass to add the two);
  - channels-last (NHWC) weights and activations for the levels whose maps are at least 8 x 8, NCHW for
    the 5 x 5 level: 125, against 113 all NCHW and 112 all NHWC;
  - gate updates with fused multiply-adds and in-place updates when no gradient is needed (level-1 step
    8 ms instead of 20 ms at batch 64); gate arithmetic on the [B, H, W, 4C] view of NHWC gates (tanh of
    a gate taken as an NCHW slice of NHWC memory: 10.4 ms, on the NHWC view: 1.8 ms); SELU in place
    (2.47 -> 2.22 CPU-s per batch of 64).
* Threads: the scorer uses `OMP_NUM_THREADS` when set, else every core it may run on. Batch 1 cannot be
  sliced and uses OpenMP threads; on a busy host those can lose more than they gain (the MSCRED test
  file, N = 5, took 25 s with two threads and 18 s with `OMP_NUM_THREADS=1` at load average 4).
* `--amp` on a CPU with AMX (this Xeon): bfloat16 autocast runs the convolutions on AMX tiles, 2-2.5x
  the fp32 windows/s; residuals move by up to about 0.006 (|R| is compared with 0.071 for theta = 0.005).
  Off by default; a checkpoint's calibration statistics are float32 ones.
"""


def windows(b: int, n: int, rng) -> WindowBatch:
    """Signature windows of random scaled series in [0, 1] (the same arithmetic as real ones)."""
    x = rng.random((b, 5, 3, n, n), dtype=np.float32)
    sig = (x + np.swapaxes(x, -1, -2)) / 2
    return WindowBatch(signatures=sig, values=np.zeros((b, 60, n), np.float32))


def model_flops(scorer: MSCREDScorer, n: int) -> float:
    x = torch.from_numpy(windows(1, n, np.random.default_rng(0)).signatures).to(scorer.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        scorer.model(x)
    return float(fc.get_total_flops())


class ConvRef:
    """One large dense conv2d, in NCHW and channels-last; reports the faster layout's GFLOP/s."""

    def __init__(self, device="cpu"):
        self.conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device).eval()
        self.conv_cl = torch.nn.Conv2d(256, 256, 3, padding=1).to(device).eval().to(memory_format=torch.channels_last)
        self.x = torch.rand(64, 256, 32, 32, device=device)
        self.x_cl = self.x.contiguous(memory_format=torch.channels_last)
        self.flops = 2 * 64 * 32 * 32 * 256 * 256 * 9

    @torch.inference_mode()
    def measure(self) -> dict[str, float]:
        out = {}
        for name, conv, x in (("nchw", self.conv, self.x), ("channels_last", self.conv_cl, self.x_cl)):
            t0 = time.perf_counter()
            conv(x)
            out[name] = self.flops / (time.perf_counter() - t0) / 1e9
        return out


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def load_avg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=int, default=38, help="N (38 = an SMD machine)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: the cores this process may use)")
    ap.add_argument("--gpu", action="store_true", help="also CUDA windows/s at batch 256, bfloat16 autocast")
    ap.add_argument("--write-docs", action="store_true", help="write the figures into docs/benchmarks.md")
    args = ap.parse_args(argv)
    n = args.features
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    scorer = MSCREDScorer([f"f{i + 1:02d}" for i in range(n)], config=MSCREDConfig(n_features=n), device="cpu",
                          threads=args.threads or None, batch_size=64)
    threads = torch.get_num_threads()
    flops = model_flops(scorer, n)
    b1, b64 = windows(1, n, rng), windows(64, n, rng)
    ref = ConvRef()
    # warm-up: oneDNN builds its kernels on first use of each shape
    scorer.score(b1), scorer.score(b64), ref.measure()
    # bfloat16 autocast on CPU (oneDNN uses AMX / avx512_bf16 where the CPU has them): same weights
    bf = MSCREDScorer(scorer.features, config=MSCREDConfig(n_features=n), device="cpu", amp=True,
                      threads=args.threads or None, batch_size=64)
    bf.model.load_state_dict(scorer.model.state_dict())
    bf.score(b64)
    ref_r2, bf_r2 = scorer.residuals(b64.signatures), bf.residuals(b64.signatures)
    bf_err = float(np.abs(np.sqrt(bf_r2) - np.sqrt(ref_r2)).max())  # |R| differences
    # the same fp32 model with every operation spread over the threads (no batch slicing), for comparison
    intra = MSCREDScorer(scorer.features, config=MSCREDConfig(n_features=n), device="cpu",
                         threads=args.threads or None, batch_size=64, slice_batches=False)
    intra.model.load_state_dict(scorer.model.state_dict())
    intra.score(b64)
    r1, r64, rin, rbf, conv = [], [], [], [], []
    load_before = load_avg()
    for r in range(args.rounds):
        conv.append(max(ref.measure().values()))
        r1.append(1 / timed(lambda: scorer.score(b1), 8))
        r64.append(64 / timed(lambda: scorer.score(b64), 1))
        rin.append(64 / timed(lambda: intra.score(b64), 1))
        rbf.append(64 / timed(lambda: bf.score(b64), 1))
        conv.append(max(ref.measure().values()))
        print(f"round {r + 1}/{args.rounds}: batch 1 {r1[-1]:.1f}, batch 64 {r64[-1]:.1f} (intra-op {rin[-1]:.1f}), "
              f"bf16 batch 64 {rbf[-1]:.1f} windows/s, conv {conv[-1]:.0f} GFLOP/s", file=sys.stderr)
    load_after = load_avg()
    med = statistics.median
    conv_g = med(conv)
    rows = []
    for name, rates in (("CPU fp32, batch 1", r1), ("CPU fp32, batch 64 (default: sliced batch)", r64),
                        ("CPU fp32, batch 64, intra-op threads only", rin)):
        w = med(rates)
        achieved = w * flops / 1e9
        rows.append((name, f"{w:.1f}", f"{min(rates):.1f}-{max(rates):.1f}", f"{achieved:.0f}",
                     f"{100 * achieved / conv_g:.0f}%"))
    w = med(rbf)
    rows.append(("CPU bf16 autocast (--amp), batch 64", f"{w:.1f}", f"{min(rbf):.1f}-{max(rbf):.1f}",
                 f"{w * flops / 1e9:.0f}", "n/a (not fp32)"))

    gpu_line = ("GPU: not measured in this run (`--gpu` on a machine with CUDA adds windows/s at batch 256, "
                "bfloat16 autocast).")
    if args.gpu:
        if not torch.cuda.is_available():
            gpu_line = "GPU: --gpu given but torch sees no CUDA device; skipped"
        else:
            g = MSCREDScorer(scorer.features, config=MSCREDConfig(n_features=n), device="cuda", amp=True,
                             batch_size=256)
            g.model.load_state_dict(scorer.model.state_dict())
            b256 = windows(256, n, rng)
            g.score(b256)
            torch.cuda.synchronize()
            rates = []
            for _ in range(args.rounds):
                rates.append(256 / timed(lambda: g.score(b256), 3))
            w = med(rates)
            rows.append((f"GPU bf16 autocast, batch 256 ({torch.cuda.get_device_name()})", f"{w:.0f}",
                         f"{min(rates):.0f}-{max(rates):.0f}", f"{w * flops / 1e9:.0f}", "n/a"))
            gpu_line = ""

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cmd = "python bench/detector.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"MSCRED, N = {n} features, 3 scales, step 5; {flops / 1e9:.2f} GFLOP per window (FlopCounterMode).",
        "",
        f"Machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads; load average "
        f"{load_before} before, {load_after} after (other work was running: figures are medians of "
        f"{args.rounds} interleaved rounds).",
        "",
        f"Dense conv2d reference (64x256x32x32, 3x3, 256->256, faster layout): {conv_g:.0f} GFLOP/s median "
        f"({min(conv):.0f}-{max(conv):.0f}).",
        "",
        "| path | windows/s (median) | range | achieved GFLOP/s | efficiency vs conv2d |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {' | '.join(r)} |" for r in rows],
    ]
    lines.append("")
    lines.append(f"bf16 autocast vs fp32 on the same weights and windows: largest difference of a residual |R_ij| "
                 f"{bf_err:.2g} (theta 0.005 on R^2 means |R| > 0.071).")
    if gpu_line:
        lines.append("")
        lines.append(gpu_line)
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs(table, cmd)
    return 0


def write_docs(table: str, cmd: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = (f"{HEADING}\n\n```bash\n.venv/bin/{cmd.strip()}\n```\n\nRun of {time.strftime('%Y-%m-%d %H:%M')} "
               f"(its output):\n\n{table}\n\n{NOTES}")
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.strip() == HEADING), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
