"""Webhook sink against a real HTTP server on loopback (failing, blocking), and the JSONL sink."""

import http.server
import json
import threading

import pytest

from osad.alerter.sinks import JsonlSink, SinkError, WebhookSink
from osad.runtime.broker import free_port
from osad.schemas import Anomaly, decode
from tests.conftest import wait_until


def anomaly(i=0):
    return Anomaly(entity_id="h/1@5", host="h", anomaly_id=f"{i:032x}", revision=i, status="open", severity="high",
                   start_ts=1.0, last_ts=2.0, score=3.0, threshold=1.0, models=["cs-jumpstarter:v1"])


class Server:
    """http.server on loopback: answers ``codes`` in turn (then 200); ``gate`` can hold requests."""

    def __init__(self, codes=()):
        self.codes = list(codes)
        self.bodies: list[bytes] = []
        self.attempts = 0
        self.gate = threading.Event()
        self.gate.set()
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                srv.gate.wait(30)
                srv.attempts += 1
                code = srv.codes.pop(0) if srv.codes else 200
                if code == 200:
                    srv.bodies.append(body)
                    assert self.headers["Content-Type"] == "application/json"
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def stop(self):
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def make(codes=()):
        s = Server(codes)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def test_webhook_retries_with_backoff_until_the_server_accepts(server):
    srv = server([500, 503])
    sink = WebhookSink(srv.url, retries=5, backoff_s=0.01)
    sink.send(anomaly(1))
    wait_until(lambda: sink.counts["sent"] == 1, 30, what="the webhook to get through on the third attempt")
    assert srv.attempts == 3 and sink.counts["retried"] == 2 and sink.counts["failed"] == 0
    assert decode(srv.bodies[0], Anomaly) == anomaly(1)
    assert json.loads(srv.bodies[0])["anomaly_id"] == f"{1:032x}"
    sink.close()


def test_webhook_gives_up_on_a_client_error_and_after_the_last_retry(server):
    srv = server([400])
    sink = WebhookSink(srv.url, retries=5, backoff_s=0.01)
    sink.send(anomaly())
    wait_until(lambda: sink.counts["failed"] == 1, 30, what="a 400 to count as failed")
    assert srv.attempts == 1 and sink.counts["retried"] == 0  # a 4xx will not get better by retrying
    sink.close()
    down = WebhookSink(f"http://127.0.0.1:{free_port()}/nobody", retries=2, backoff_s=0.01, timeout_s=2)
    down.send(anomaly())
    wait_until(lambda: down.counts["failed"] == 1, 30, what="an unreachable webhook to count as failed")
    assert down.counts["retried"] == 2 and down.counts["sent"] == 0
    down.close()


def test_a_full_queue_drops_the_oldest_and_never_blocks(server):
    srv = server()
    srv.gate.clear()  # the server holds every request: the sink's thread is stuck on the first POST
    sink = WebhookSink(srv.url, queue_size=2, retries=0)
    sink.send(anomaly(0))
    wait_until(lambda: sink.pending() == 1 and not sink.queue, 30, what="the first POST to be in flight")
    for i in range(1, 6):
        sink.send(anomaly(i))  # returns at once although nothing is delivered
    assert srv.attempts == 0 and sink.counts["dropped"] == 3 and len(sink.queue) == 2
    srv.gate.set()
    wait_until(lambda: sink.counts["sent"] == 3, 30, what="the queued anomalies to be delivered")
    assert [decode(b, Anomaly).revision for b in srv.bodies] == [0, 4, 5]  # 1, 2, 3 were the oldest waiting
    sink.close()


def test_close_delivers_what_is_queued(server):
    srv = server()
    sink = WebhookSink(srv.url)
    for i in range(5):
        sink.send(anomaly(i))
    sink.close(timeout_s=30)
    assert sink.counts["sent"] == 5 and len(srv.bodies) == 5 and not sink._thread.is_alive()


def test_bad_webhook_url_is_rejected():
    with pytest.raises(SinkError, match="http:// or https://"):
        WebhookSink("ftp://example/x")


def test_jsonl_appends_one_anomaly_per_line(tmp_path):
    path = tmp_path / "sub" / "anomalies.jsonl"
    sink = JsonlSink(str(path))
    sink.send(anomaly(0))
    sink.send(anomaly(1))
    sink.close()
    sink = JsonlSink(str(path))  # appends, never truncates
    sink.send(anomaly(2))
    sink.close()
    lines = path.read_bytes().splitlines()
    assert [decode(x, Anomaly).revision for x in lines] == [0, 1, 2]
    with pytest.raises(SinkError, match="cannot open"):
        JsonlSink(str(tmp_path))  # a folder
