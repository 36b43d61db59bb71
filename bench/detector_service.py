"""The detector service fed through the broker vs the bare model, same run.

    .venv/bin/python bench/detector_service.py [--windows 384] [--batch 64] [--rounds 3]

MSCRED, 38 features (SMD machine-1-6 windows), CPU. The bare model scores the windows with
``MSCREDScorer.score`` in batches of ``--batch`` (median windows/s over rounds). The service
run pre-loads the same windows into the signatures topic of an embedded broker, starts
``osad detect --no-cs --max-batch BATCH`` as its own process with a checkpoint of that model,
and measures its output rate from the Score messages' timestamps (first to last), so start-up
and the consumer group join are not counted. Prints both and the ratio (target >= 0.8).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)  # not bench/: its file names would shadow the packages

import numpy as np  # noqa: E402

from bench._common import assign_all, http_text, osad_process, stop_processes, wait_for  # noqa: E402
from osad.core.datasets import load_entity  # noqa: E402
from osad.core.signature import Ranges, signature_windows, window_ends  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=384)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "SMD"))
    ap.add_argument("--detect-arg", action="append", default=[], help="extra argument for osad detect (repeatable)")
    a = ap.parse_args()

    import torch
    from kafka import KafkaConsumer, KafkaProducer

    from osad.detector.base import WindowBatch
    from osad.detector.mscred import MSCREDScorer
    from osad.detector.mscred_net import MSCREDConfig
    from osad.runtime.broker import EmbeddedBroker
    from osad.runtime.kafka import ensure_topics
    from osad.schemas import SCORES, SIGNATURES, Score, SignatureWindow, decode, encode

    ent = load_entity(a.data, "machine-1-6")
    r = Ranges.fit(ent.feature_names, ent.train)
    x = r.transform(ent.test)
    ends = window_ends(x.shape[0])[: a.windows]
    sig = signature_windows(x, ends)
    vals = np.stack([x[t - 59:t + 1] for t in ends]).astype(np.float32)

    torch.manual_seed(0)
    scorer = MSCREDScorer(ent.feature_names, ranges=r, config=MSCREDConfig(n_features=38))
    tmp = Path(tempfile.mkdtemp(prefix="osad-bench-"))
    (tmp / "models").mkdir()
    scorer.save(tmp / "models" / "bench.safetensors")

    bare = []
    for rnd in range(a.rounds):
        t0 = time.perf_counter()
        for i in range(0, len(ends), a.batch):
            scorer.score(WindowBatch(sig[i:i + a.batch], vals[i:i + a.batch]))
        bare.append(len(ends) / (time.perf_counter() - t0))
        print(f"bare model round {rnd + 1}: {bare[-1]:.1f} windows/s", file=sys.stderr)

    os.environ["OSAD_TOPIC_PREFIX"] = "bench."
    with EmbeddedBroker() as b:
        ensure_topics(b.bootstrap)
        prod = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all", linger_ms=5, max_request_size=8 << 20)
        for i, t in enumerate(ends):
            w = SignatureWindow(entity_id=f"SMD/m{i % 16}", host="bench", comm="bench", window_end_ts=float(t),
                                window_end_seq=int(t), interval_s=60.0, gap=10, scales=[10, 30, 60],
                                features=ent.feature_names, scaling_id=r.scaling_id, signatures=sig[i],
                                values=vals[i])
            prod.send(SIGNATURES.full_name(), key=w.entity_id.encode(), value=encode(w))
        prod.flush()
        prod.close()
        from osad.runtime.broker import free_port

        mport = free_port()
        wrap = os.environ.get("OSAD_BENCH_WRAP", "").split()
        p = osad_process(["detect", "--bootstrap", b.bootstrap, "--no-cs", "--models", str(tmp / "models"),
                          "--max-batch", str(a.batch), "--max-wait-ms", "200", "--metrics-port", str(mport),
                          "--log-level", "WARNING", *a.detect_arg], tmp / "detector.log", wrap=wrap)
        c = KafkaConsumer(bootstrap_servers=b.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
        got, stamps = 0, []
        try:
            wait_for(lambda: assign_all(c, SCORES.full_name()), 60, "the scores topic's metadata", every_s=0.2)
            deadline = time.monotonic() + 900
            while got < len(ends) and time.monotonic() < deadline:
                for msgs in c.poll(500).values():
                    for m in msgs:
                        decode(m.value, Score)
                        stamps.append(m.timestamp / 1000.0)
                        got += 1
            met = http_text(mport, "/metrics") or ""
            calls = [ln for ln in met.splitlines() if ln.startswith("osad_detector_batch_windows_count")
                     or ln.startswith("osad_detector_model_seconds_sum")]
            print("service: " + "; ".join(calls), file=sys.stderr)
        finally:
            # a profiler wrapper writes its output on Ctrl-C
            stop_processes([p], timeout_s=60, sig=signal.SIGINT if wrap else signal.SIGTERM)
            c.close()
    if got < len(ends):
        print(f"the service scored only {got}/{len(ends)} windows; see {tmp / 'detector.log'}", file=sys.stderr)
        return 1
    stamps.sort()
    # the first batch's scores share one timestamp; rate over the rest
    svc = (len(stamps) - a.batch) / max(1e-9, stamps[-1] - stamps[a.batch - 1]) if len(stamps) > a.batch else 0.0
    mb = statistics.median(bare)
    print(f"MSCRED, 38 features, batch {a.batch}, {len(ends)} windows, CPU ({torch.get_num_threads()} threads)")
    print(f"  bare model          : {mb:8.1f} windows/s (median of {a.rounds})")
    print(f"  service via broker  : {svc:8.1f} windows/s (Score timestamps, first batch excluded)")
    print(f"  ratio service / bare: {svc / mb:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
