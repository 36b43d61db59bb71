"""Where operators look: Prometheus metrics, the Grafana dashboard, the rules, the Alertmanager webhook payload.

* The dashboard (deploy/grafana/osad-dashboard.json) and the rules (deploy/prometheus/osad-rules.yml) are checked
  against real scrapes: the four services run on the embedded broker, a synthetic process goes through the
  pipeline until an incident opens and closes, and every metric name in every PromQL expression (and every
  label value an expression matches literally) must be served by some service. The score, threshold and
  incident metrics must carry the values the topics show.
* The alerter, run with ``--webhook-format alertmanager``, posts Alertmanager's webhook payload to a real HTTP
  server: firing, then resolved.
* Pure checks: the PromQL name extraction, the payload function, the bounds of the per-entity series.
"""

from __future__ import annotations

import argparse
import http.server
import json
import math
import re
import threading
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from osad.alerter.cli import AlertConfig
from osad.alerter.core import AlerterConfig
from osad.alerter.incidents import severity_of
from osad.alerter.service import Alerter
from osad.alerter.sinks import ZERO_TIME, AlertmanagerWebhookSink, SinkError, alertmanager_payload, rfc3339
from osad.alerter.store import open_store
from osad.runtime.config import ConfigError
from osad.runtime.metrics import ServiceMetrics
from osad.runtime.service import InputMeta
from osad.schemas import ANOMALIES, SAMPLES, SCORES, SIGNATURES, Anomaly, RootCause, Sample, Score, encode
from tests.conftest import ROOT, wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "osad-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "osad-rules.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
#: series Prometheus makes itself for every target (not served by a service)
PROMETHEUS_OWN = {"up"}
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


# -- PromQL: the metric names and literal label matchers of an expression -----------------------------------

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
                "quantile", "limitk", "limit_ratio"}
KEYWORDS = AGGREGATIONS | {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and",
                           "or", "unless", "atan2", "inf", "nan", "start", "end"}
IDENT = r"[A-Za-z_:][\w:]*"


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers before ``{`` or ``[`` or standing alone, not functions
    (followed by ``(``), keywords, aggregation operators, label names (inside ``{}`` and ``by/on (...)``),
    strings, numbers, durations or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # string literals
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)  # Grafana variables ($__rate_interval, ${DS_PROMETHEUS})
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", e)  # label lists
    names = set()
    for m in re.finditer(rf"(?<![\w:.]){IDENT}", e):
        if re.match(r"\s*\(", e[m.end():]) or m.group(0) in KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def promql_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """``(metric, {label: value})`` for every selector with equality matchers on literal values."""
    out = []
    for m in re.finditer(rf"(?<![\w:.])({IDENT})\s*\{{([^}}]*)\}}", expr):
        eq = {k: v for k, op, v in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"', m.group(2))
              if op == "=" and "$" not in v}
        out.append((m.group(1), eq))
    return out


def test_promql_names_are_found_and_functions_keywords_labels_and_variables_are_not():
    e = ('100 * (1 - sum by (model) (rate(osad_a_bucket{le="1.0", model=~"$model"}[$__rate_interval])) '
         '/ on (model) group_left sum by (model) (rate(osad_b_count[5m] offset 1h))) and osad_c > 1e-3')
    assert promql_metric_names(e) == {"osad_a_bucket", "osad_b_count", "osad_c"}
    assert promql_metric_names("histogram_quantile(0.99, sum by (service, le) (rate(x_bucket[1m])))") == {"x_bucket"}
    assert promql_metric_names('topk(10, max by (entity) (a{h=~"$host"}) / on (entity) max by (entity) (b))') == \
        {"a", "b"}
    assert promql_metric_names('up{job=~"osad-.*"} == 0') == {"up"}
    assert promql_metric_names("osad:rule:ratio") == {"osad:rule:ratio"}
    assert promql_selectors('sum(rate(m_total{service="det", topic="osad.x", e=~"$e", k!="v"}[5m])) + n{a="$v"}') \
        == [("m_total", {"service": "det", "topic": "osad.x"}), ("n", {})]


def _walk(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    """Every target's expression, and the metric of every template variable's label_values()."""
    d = dashboard()
    exprs = [t["expr"] for targets in _walk(d["panels"], "targets") for t in targets]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.match(rf"label_values\(\s*({IDENT}(?:\{{[^}}]*\}})?)\s*,", q)
            assert m, f"template variable {v['name']}: label_values(METRIC, LABEL) expected, got {q!r}"
            exprs.append(m.group(1))
    return exprs


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def rules_exprs() -> list[str]:
    return [r["expr"] for r in rules()]


def test_the_dashboard_is_an_importable_grafana_dashboard_over_osads_metrics():
    d = dashboard()
    assert d["schemaVersion"] == 39 and d["uid"] and d["title"]
    ds = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds] == [("DS_PROMETHEUS", "prometheus")]
    panels = [p for p in _walk(d["panels"], "gridPos")]
    assert all(g["x"] + g["w"] <= 24 for g in panels)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["refId"] and t["expr"], p["title"]
    names = set().union(*map(promql_metric_names, dashboard_exprs()))
    # what the issue asks the dashboard to show
    assert {"osad_detector_last_score", "osad_alerter_threshold", "osad_alerter_open_incidents",
            "osad_alerter_incidents_opened_total", "osad_alerter_incident_max_ratio", "osad_detector_score_bucket",
            "osad_messages_in_total", "osad_detector_scores_total", "osad_collector_samples_total",
            "osad_consumer_lag", "osad_processing_seconds_bucket", "osad_dead_letters_total"} <= names
    titles = {p["title"] for p in d["panels"]}
    assert {"Score vs threshold", "Open incidents", "Incidents opened by severity", "Throughput", "Consumer lag",
            "Errors and dead letters"} <= titles


def test_the_prometheus_config_scrapes_the_four_services_on_their_default_ports():
    from osad.pipeline import METRICS_PORT, PIPELINE, metrics_ports

    cfg = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in cfg["scrape_configs"]}
    expected = {f"osad-{name}": [f"localhost:{port}"] for name, port in metrics_ports(PIPELINE, METRICS_PORT).items()}
    assert jobs == expected  # what `osad up` serves: consecutive ports from 9400 in start order
    assert [(PROMETHEUS.parent / f).is_file() for f in cfg["rule_files"]] == [True]


def test_every_rule_is_complete():
    rs = rules()
    assert {r["alert"] for r in rs if "alert" in r} >= {"OsadServiceDown", "OsadNotCommitting", "OsadDeadLetters",
                                                        "OsadIncident"}
    for r in rs:
        assert r.get("expr") and ("record" in r) != ("alert" in r), r
        if "record" in r:
            assert re.fullmatch(r"osad:\w+:\w+", r["record"]), r["record"]  # level:metric:operations
        else:
            assert r["annotations"]["summary"], r["alert"]


# -- Prometheus text, as a service serves it ------------------------------------------------------------------

def parse_samples(text: str) -> list[tuple[str, dict, float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def scrape(port: int) -> list[tuple[str, dict, float]]:
    from tests.kafkautil import http_get

    code, text = http_get(port, "/metrics")
    assert code == 200, f"/metrics on {port}: HTTP {code}"
    return parse_samples(text)


def value(samples, name: str, **labels) -> float | None:
    """The sum of the samples of ``name`` whose labels include ``labels`` (None: no such sample)."""
    got = [v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]
    return sum(got) if got else None


def registry_samples(metrics: ServiceMetrics):
    return parse_samples(generate_latest(metrics.registry).decode())


# -- the per-entity series: values and bounds (no Kafka) -------------------------------------------------------

FEATS = ["on_cpu_ns", "rss_anon_bytes", "net_tx_bytes", "syscalls"]


def score(entity: str, i: int, v: float, hot: int = 1, model: str = "cs-jumpstarter:v1") -> Score:
    contrib = [0.1] * len(FEATS)
    contrib[hot] = 1.0
    seq = 100 + 10 * i
    return Score(entity_id=entity, host=entity.split("/")[0], pid=42, comm="worker", window_end_ts=1.7e9 + seq,
                 window_end_seq=seq, interval_s=1.0, gap=10, model_id=model, score=float(v), features=FEATS,
                 contributions=contrib)


def test_alerter_threshold_and_incident_series_follow_its_memory_and_counters_count_by_severity(tmp_path):
    al = Alerter(AlerterConfig(calibration_scores=20, arm_scores=0, max_entities=1),
                 open_store(f"sqlite:///{tmp_path}/a.db"))
    m = ServiceMetrics("alerter")
    al.bind_metrics(m)
    a = "web-1/42@7"

    def feed(*scores):
        out = []
        for k, s in enumerate(scores):
            out += [o.msg for o in al.process(s, InputMeta(SCORES.name, 0, k))]
        al.tick(0.0)
        return out

    feed(*[score(a, i, 1.0 + 0.05 * math.sin(i)) for i in range(20)])
    got = registry_samples(m)
    assert value(got, "osad_alerter_threshold") is None  # calibrating: no threshold yet
    assert value(got, "osad_alerter_score_ratio_count") is None
    for sev in ("low", "medium", "high", "critical"):  # every series exists before the first incident
        assert value(got, "osad_alerter_incidents_opened_total", severity=sev, scope="entity") == 0
        assert value(got, "osad_alerter_incidents_closed_total", severity=sev, scope="host") == 0
    thr = al.engine.entities[a].streams["cs-jumpstarter:v1"].threshold
    opened = feed(score(a, 20, 0.5 * thr), score(a, 21, 2 * thr), score(a, 22, 5 * thr))
    assert [x.status for x in opened] == ["open"] and opened[0].severity == "high"
    got = registry_samples(m)
    assert value(got, "osad_alerter_threshold", entity=a, host="web-1", model="cs-jumpstarter") == thr
    assert value(got, "osad_alerter_incident_max_ratio", entity=a, scope="entity", severity="high") == \
        pytest.approx(5.0)
    assert value(got, "osad_alerter_incidents_opened_total", severity="high", scope="entity") == 1
    assert value(got, "osad_alerter_incidents_opened_total") == 1
    assert value(got, "osad_alerter_open_incidents") == 1
    assert value(got, "osad_alerter_score_ratio_count", model="cs-jumpstarter") == 3
    assert value(got, "osad_alerter_score_ratio_bucket", le="1.0") == 1  # 0.5x under, 2x and 5x over
    assert value(got, "osad_alerter_score_ratio_bucket", le="3.0") == 2
    closed = feed(score(a, 23, 12 * thr), *[score(a, i, 0.5 * thr) for i in (24, 25, 26)])
    assert [x.status for x in closed][-1] == "closed" and closed[-1].severity == "critical"
    got = registry_samples(m)
    assert value(got, "osad_alerter_incident_max_ratio") is None  # closed: the series is gone
    assert value(got, "osad_alerter_incidents_closed_total", severity="critical", scope="entity") == 1
    assert value(got, "osad_alerter_incidents_closed_total") == 1
    assert value(got, "osad_alerter_incidents_opened_total", severity="high") == 1  # severity at opening

    # another entity: over --max-entities 1 the first leaves memory, and its series with it
    feed(score("web-2/5@9", 0, 1.0))
    assert a not in al.engine.entities
    got = registry_samples(m)
    assert value(got, "osad_alerter_threshold") is None
    assert value(got, "osad_alerter_entities") == 1


def test_alerter_exports_only_thresholds_of_streams_it_still_judges(tmp_path):
    al = Alerter(AlerterConfig(calibration_scores=5, stale_windows=3), open_store(f"sqlite:///{tmp_path}/s.db"))
    m = ServiceMetrics("alerter")
    al.bind_metrics(m)
    e = "h/1@2"
    for i in range(6):
        al.process(score(e, i, 1.0 + 0.1 * (i % 3), model="cs-jumpstarter:v1"), InputMeta(SCORES.name, 0, i))
    assert value(registry_samples(m), "osad_alerter_threshold", model="cs-jumpstarter") is not None
    # the entity is scored by another family from now on (calibrated): the old one goes once it is stale
    for i in range(6, 16):
        al.process(score(e, i, 1.0 + 0.1 * (i % 3), model="cs-calibrated:fitted:x"), InputMeta(SCORES.name, 0, i))
        live = {lab["model"] for n, lab, _ in registry_samples(m) if n == "osad_alerter_threshold"}
        assert ("cs-jumpstarter" in live) == (i - 5 <= 3), (i, live)


def window(eid: str, seq: int, part_seed: int = 0):
    import numpy as np

    from osad.schemas import SignatureWindow

    rng = np.random.default_rng(seq + 1000 * part_seed)
    return SignatureWindow(entity_id=eid, host=eid.split("/")[0], window_end_ts=float(seq), window_end_seq=seq,
                           interval_s=1.0, gap=5, scales=[60], features=["a", "b", "c"],
                           signatures=np.full((1, 1, 3, 3), 0.25, np.float32),
                           values=(0.5 + 0.1 * rng.normal(size=(60, 3))).astype(np.float32))


def test_detector_last_score_series_are_the_latest_scores_and_bounded():
    from osad.detector.cs import CSScorer
    from osad.detector.engine import Engine, EngineConfig
    from osad.detector.service import BatchConfig, Detector

    now = [0.0]
    det = Detector(Engine(CSScorer(gap=5, max_iter=40), EngineConfig(cs_calibrate=5, cs_handover=0)), BatchConfig(max_batch=1),
                   clock=lambda: now[0], series_max_entities=2, series_idle_s=100.0)
    m = ServiceMetrics("detector")
    det.bind_metrics(m)

    def feed(eid, seqs, partition=0):
        return [o.msg for s in seqs for o in det.process_batch([(window(eid, s), InputMeta("w", partition, s))])]

    a = feed("h1/1@1", [59 + 5 * k for k in range(8)])  # 5 jump-started (the 5th calibrates), then 3 calibrated
    got = registry_samples(m)
    last = {(s.entity_id, s.model_id.split(":")[0]): s.score for s in a}
    assert value(got, "osad_detector_last_score", entity="h1/1@1", host="h1", model="cs-calibrated") == \
        last[("h1/1@1", "cs-calibrated")]
    # cs-jumpstarter scored the entity 3 windows ago: still there; one more window and it is stale
    assert value(got, "osad_detector_last_score", model="cs-jumpstarter") == last[("h1/1@1", "cs-jumpstarter")]
    a += feed("h1/1@1", [59 + 5 * 8])
    got = registry_samples(m)
    assert value(got, "osad_detector_last_score", model="cs-jumpstarter") is None
    assert value(got, "osad_detector_last_score", model="cs-calibrated") == a[-1].score
    assert value(got, "osad_detector_score_count", model="cs-jumpstarter") == 5
    assert value(got, "osad_detector_score_count", model="cs-calibrated") == 4
    assert value(got, "osad_detector_score_sum") == pytest.approx(sum(s.score for s in a), rel=1e-12)

    # at most 2 entities: the least recently scored leaves first
    feed("h2/2@2", [59], partition=1)
    feed("h3/3@3", [59], partition=2)
    got = registry_samples(m)
    assert {lab["entity"] for n, lab, _ in got if n == "osad_detector_last_score"} == {"h2/2@2", "h3/3@3"}
    det.tick(0.0)
    assert value(registry_samples(m), "osad_detector_scored_entities") == 2
    # a revoked partition's entities go (their new owner exports them)
    det.revoke({1})
    assert {lab["entity"] for n, lab, _ in registry_samples(m) if n == "osad_detector_last_score"} == {"h3/3@3"}
    # idle entities go
    now[0] = 100.0
    det.tick(0.0)
    got = registry_samples(m)
    assert value(got, "osad_detector_last_score") is None and value(got, "osad_detector_scored_entities") == 0


# -- Alertmanager's webhook payload (pure) ---------------------------------------------------------------------

def anomaly(status="open", revision=0, **kw) -> Anomaly:
    base = dict(entity_id="web-1/4242@887123", host="web-1", pid=4242, comm="python3",
                anomaly_id="d70c4fcf28243ed98aef2c5d3393e0e6", revision=revision, status=status, severity="high",
                start_ts=1767228890.0, last_ts=1767228920.0, end_ts=1767228915.5 if status == "closed" else None,
                score=6.0, threshold=0.95, models=["cs-jumpstarter:rate=0.4:seed=0", "mscred:ab12"],
                root_causes=[RootCause(feature="rss_anon_bytes", contribution=0.645161),
                             RootCause(feature="minor_faults", contribution=0.258065)],
                summary="python3: cs-jumpstarter over threshold in 3 window(s), max 6.34x threshold (high)",
                max_ratio=6.342, windows_over=3, first_window_seq=3300)
    base.update(kw)
    return Anomaly(**base)


def test_alertmanager_payload_of_an_open_incident_is_firing_with_labels_and_annotations():
    p = alertmanager_payload(anomaly())
    assert json.loads(json.dumps(p)) == p  # plain JSON
    assert (p["version"], p["status"], p["receiver"], p["truncatedAlerts"]) == ("4", "firing", "osad", 0)
    [alert] = p["alerts"]
    assert alert["status"] == "firing"
    assert alert["labels"] == {"alertname": "OsadAnomaly", "anomaly_id": "d70c4fcf28243ed98aef2c5d3393e0e6",
                               "entity": "web-1/4242@887123", "host": "web-1", "severity": "high", "scope": "entity",
                               "comm": "python3", "pid": "4242"}
    assert all(isinstance(v, str) for v in {**alert["labels"], **alert["annotations"]}.values())
    ann = alert["annotations"]
    assert ann["summary"].startswith("python3: cs-jumpstarter over threshold")
    assert ann["top_features"] == "rss_anon_bytes 64.5%, minor_faults 25.8%"
    assert ann["models"] == "cs-jumpstarter, mscred" and ann["max_ratio"] == "6.342"
    assert ann["osad_status"] == "open" and ann["revision"] == "0"
    assert "python3 (pid 4242) on web-1" in ann["description"] and "rss_anon_bytes 64.5%" in ann["description"]
    assert alert["startsAt"] == "2026-01-01T00:54:50.000Z" and alert["endsAt"] == ZERO_TIME == "0001-01-01T00:00:00Z"
    assert RFC3339.match(alert["startsAt"]) and RFC3339.match(alert["endsAt"])
    assert alert["fingerprint"] == "d70c4fcf28243ed9" and alert["generatorURL"] == "" and p["externalURL"] == ""
    assert p["commonLabels"] == alert["labels"] and p["commonAnnotations"] == ann
    assert p["groupLabels"] == {"alertname": "OsadAnomaly", "anomaly_id": "d70c4fcf28243ed98aef2c5d3393e0e6"}
    assert p["groupKey"] == '{}:{alertname="OsadAnomaly", anomaly_id="d70c4fcf28243ed98aef2c5d3393e0e6"}'


def test_alertmanager_payload_of_a_closed_incident_is_resolved_with_its_end_and_keeps_its_identity():
    opened, closed = alertmanager_payload(anomaly()), alertmanager_payload(anomaly("closed", 2, severity="critical"))
    assert closed["status"] == closed["alerts"][0]["status"] == "resolved"
    a = closed["alerts"][0]
    assert a["endsAt"] == "2026-01-01T00:55:15.500Z"  # end_ts: the end of the last window over threshold
    assert datetime.fromisoformat(a["endsAt"]) > datetime.fromisoformat(a["startsAt"])
    assert a["startsAt"] == opened["alerts"][0]["startsAt"]
    assert a["fingerprint"] == opened["alerts"][0]["fingerprint"] and closed["groupKey"] == opened["groupKey"]
    assert a["labels"]["severity"] == "critical" and a["annotations"]["osad_status"] == "closed"
    # no end_ts (an older producer): the last window considered ends it
    assert alertmanager_payload(anomaly("closed", end_ts=None))["alerts"][0]["endsAt"] == rfc3339(1767228920.0)


def test_alertmanager_payload_of_a_host_event_and_with_a_link():
    host = anomaly(entity_id="host:web-1", pid=None, comm="", scope="host",
                   members=["web-1/1@1", "web-1/2@2", "web-1/3@3"])
    link = "https://grafana.example/d/osad-overview?var-entity={entity}&var-host={host}&id={anomaly_id}"
    p = alertmanager_payload(host, receiver="ops", link=link)
    a = p["alerts"][0]
    assert p["receiver"] == "ops"
    assert a["labels"]["scope"] == "host" and a["labels"]["entity"] == "host:web-1"
    assert "pid" not in a["labels"] and "comm" not in a["labels"]  # empty values are left out, as Alertmanager does
    assert a["annotations"]["members"] == "web-1/1@1, web-1/2@2, web-1/3@3"
    assert a["annotations"]["description"].startswith("host web-1 (3 processes together)")
    assert a["generatorURL"] == ("https://grafana.example/d/osad-overview?var-entity=host%3Aweb-1&var-host=web-1"
                                 "&id=d70c4fcf28243ed98aef2c5d3393e0e6")
    assert p["externalURL"] == "https://grafana.example"
    with pytest.raises(SinkError, match="--webhook-link"):
        AlertmanagerWebhookSink("http://127.0.0.1:1/x", link="https://g/{nope}")


def test_webhook_format_is_one_setting_with_its_variable():
    def parse(argv, env):
        p = argparse.ArgumentParser()
        AlertConfig.add_arguments(p, environ=env)
        return AlertConfig.from_args(p.parse_args(argv))

    assert parse([], {}).webhook_format == "osad"
    assert parse([], {"OSAD_WEBHOOK_FORMAT": "alertmanager"}).webhook_format == "alertmanager"
    assert parse(["--webhook-format", "osad"], {"OSAD_WEBHOOK_FORMAT": "alertmanager"}).webhook_format == "osad"
    with pytest.raises(ConfigError, match="OSAD_WEBHOOK_FORMAT"):
        parse([], {"OSAD_WEBHOOK_FORMAT": "slack"})


# -- on the real broker ------------------------------------------------------------------------------------------

class Receiver:
    """An HTTP server on loopback that keeps every POST (path, headers, JSON body)."""

    def __init__(self):
        from osad.runtime.broker import free_port

        self.posts: list[tuple[str, dict, dict]] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                srv.posts.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.port = free_port()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def produce(broker, topic: str, msgs) -> None:
    from kafka import KafkaProducer

    prod = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
    for m in msgs:
        prod.send(topic, key=m.entity_id.encode(), value=encode(m))
    prod.flush()
    prod.close()


@pytest.mark.broker
@pytest.mark.slow
def test_alerter_posts_alertmanager_webhooks_firing_then_resolved(broker, topic_prefix, tmp_path):
    from osad.runtime.broker import free_port
    from tests.kafkautil import Proc, TopicReader, health, metric

    e = "host/42@1234"
    rx = Receiver()
    port = free_port()
    link = "http://grafana.example/d/osad-overview?var-entity={entity}"
    # the format from its environment variable, as a container would set it
    a = Proc(["alert", "--bootstrap", broker.bootstrap, "--metrics-port", str(port), "--store",
              f"sqlite:///{tmp_path}/a.db", "--calibration-scores", "30", "--webhook", f"http://127.0.0.1:{rx.port}/am",
              "--webhook-link", link], tmp_path / "alerter.log", env={"OSAD_WEBHOOK_FORMAT": "alertmanager"})
    reader = TopicReader(broker.bootstrap, ANOMALIES, prefix=topic_prefix)
    try:
        wait_until(lambda: (health(port) or {}).get("status") == "ok", 90, what="the alerter to be healthy")
        scores = [score(e, i, 1.0 + 0.05 * math.sin(i)) for i in range(30)]
        scores += [score(e, 30 + i, v) for i, v in enumerate([8, 9, 40, 41, 0.5, 0.5, 0.5, 0.5])]
        produce(broker, SCORES.full_name(topic_prefix), scores)
        reader.read_until(lambda r: any(x.status == "closed" for x in reader.messages()), 120, "the incident to close")
        states = reader.messages()
        wait_until(lambda: len(rx.posts) >= len(states), 60, what="a POST for every anomaly state")
        wait_until(lambda: metric(port, "osad_alerter_sink_total", result="sent") == len(states), 60,
                   what="the deliveries to be counted")
    finally:
        assert a.terminate() == 0
        rx.stop()
        reader.close()

    assert [x.status for x in states] == ["open", "update", "closed"]
    bodies = [b for _, _, b in rx.posts]
    assert len(bodies) == 3 and {p for p, _, _ in rx.posts} == {"/am"}
    assert all(h["Content-Type"] == "application/json" for _, h, _ in rx.posts)
    assert [b["version"] for b in bodies] == ["4"] * 3
    assert [b["status"] for b in bodies] == [b["alerts"][0]["status"] for b in bodies] == ["firing", "firing",
                                                                                            "resolved"]
    alerts = [b["alerts"][0] for b in bodies]
    for st, al in zip(states, alerts):
        assert al["labels"] == {"alertname": "OsadAnomaly", "anomaly_id": st.anomaly_id, "entity": e, "host": "host",
                                "severity": st.severity, "scope": "entity", "comm": "worker", "pid": "42"}
        assert al["annotations"]["top_features"].startswith("rss_anon_bytes ")  # the hot feature
        assert al["annotations"]["revision"] == str(st.revision)
        assert RFC3339.match(al["startsAt"]) and RFC3339.match(al["endsAt"])
        assert datetime.fromisoformat(al["startsAt"]).timestamp() == pytest.approx(st.start_ts, abs=1e-3)
        assert al["generatorURL"] == "http://grafana.example/d/osad-overview?var-entity=host%2F42%401234"
    assert len({al["fingerprint"] for al in alerts}) == 1 and len({b["groupKey"] for b in bodies}) == 1
    assert [al["endsAt"] for al in alerts[:2]] == [ZERO_TIME] * 2
    assert datetime.fromisoformat(alerts[2]["endsAt"]).timestamp() == pytest.approx(states[2].end_ts, abs=1e-3)
    assert alerts[2]["endsAt"] > alerts[2]["startsAt"]


def sample(entity: str, i: int, spike: bool) -> Sample:
    """A synthetic process of 4 metrics (sines of different periods); a spike is a short burst of two metrics in
    every window's newest samples (what compressed sensing cannot reconstruct from the rest)."""
    m = {f"m{k}": math.sin(i / (5 + k)) + 0.1 * k for k in range(4)}
    if spike and i % 10 in (4, 5):
        m["m0"] += 3.0
        m["m1"] += 3.0
    return Sample(entity_id=entity, host="h1", pid=77, comm="synth", ts=1.7e9 + i, interval_s=1.0, seq=i, metrics=m)


@pytest.mark.broker
@pytest.mark.slow
def test_dashboard_and_rules_metrics_are_served_by_the_real_services(broker, topic_prefix, tmp_path):
    """Collector, featurizer, detector and alerter as processes; one synthetic process through calibration, a
    burst that opens an incident, and back to normal (closed). Every metric the dashboard and the rules query is
    scraped from them, and the score, threshold and incident metrics carry what the topics show."""
    from osad.runtime.broker import free_port
    from tests.kafkautil import Proc, TopicReader, health, metric, produce_raw

    e = "h1/77@5"
    ports = {s: free_port() for s in ("collector", "featurizer", "detector", "alerter")}
    procs = {
        "featurizer": Proc(["featurizer", "--bootstrap", broker.bootstrap, "--metrics-port", str(ports["featurizer"]),
                            "--state-dir", str(tmp_path / "state"), "--calibration-samples", "50"],
                           tmp_path / "featurizer.log"),
        "detector": Proc(["detect", "--bootstrap", broker.bootstrap, "--metrics-port", str(ports["detector"]),
                          "--models", str(tmp_path / "models"), "--max-wait-ms", "50", "--cs-calibrate", "0"],
                         tmp_path / "detector.log"),
        "alerter": Proc(["alert", "--bootstrap", broker.bootstrap, "--metrics-port", str(ports["alerter"]),
                         "--store", f"sqlite:///{tmp_path}/a.db", "--calibration-scores", "20", "--arm-scores", "0",
                         "--jsonl", str(tmp_path / "anomalies.jsonl")], tmp_path / "alerter.log"),
        # the collector watches a sleeping process and records to a file (its Samples stay out of the pipeline)
        "collector": Proc(["collect", "--command", "sleep 600", "--output", f"jsonl:{tmp_path}/collector.jsonl",
                           "--metrics-port", str(ports["collector"])], tmp_path / "collector.log"),
    }
    scores = TopicReader(broker.bootstrap, SCORES, prefix=topic_prefix)
    anomalies = TopicReader(broker.bootstrap, ANOMALIES, prefix=topic_prefix)

    def last_seq_scored(seq):
        return lambda r: any(s.window_end_seq == seq for s in scores.messages())

    def alerter_judged(n):
        """The alerter has read n Scores and judged all but the 20 that calibrate (its metrics count a Score
        as read before judging it, and as judged once its state is updated)."""
        return lambda: (metric(ports["alerter"], "osad_messages_in_total") == n
                        and metric(ports["alerter"], "osad_alerter_score_ratio_count") == n - 20)

    try:
        for name in ("featurizer", "detector", "alerter"):
            wait_until(lambda: (health(ports[name]) or {}).get("status") == "ok", 120, what=f"the {name} to be healthy")
        produce_raw(broker.bootstrap, SIGNATURES.full_name(topic_prefix), b"x", b"not a frame")  # a dead letter
        produce(broker, SAMPLES.full_name(topic_prefix), [sample(e, i, spike=i >= 300) for i in range(340)])

        # -- the incident is open ----------------------------------------------------------------------------
        scores.read_until(last_seq_scored(339), 180, "the windows up to sample 339 to be scored")
        phase1 = sorted(scores.messages(), key=lambda s: s.window_end_seq)
        wait_until(alerter_judged(len(phase1)), 60, what="the alerter to judge every Score so far")
        anomalies.read_until(lambda r: r, 60, "the incident to open")
        wait_until(lambda: metric(ports["detector"], "osad_dead_letters_total") == 1, 60, what="the dead letter")
        wait_until(lambda: metric(ports["alerter"], "osad_alerter_open_incidents") == 1, 60,
                   what="the open incidents gauge to count the incident")  # (set after each poll)
        opened = anomalies.messages()[0]
        assert opened.status == "open" and opened.entity_id == e
        det, al = scrape(ports["detector"]), scrape(ports["alerter"])
        while_open = det + al  # (osad_alerter_incident_max_ratio exists only while an incident is open)
        assert {s.model_id.split(":")[0] for s in phase1} == {"cs-jumpstarter"}
        assert value(det, "osad_detector_last_score", entity=e, host="h1", model="cs-jumpstarter") == phase1[-1].score
        assert value(det, "osad_detector_score_count", model="cs-jumpstarter") == len(phase1)
        assert value(det, "osad_detector_score_sum") == pytest.approx(sum(s.score for s in phase1), rel=1e-9)
        assert value(det, "osad_detector_scored_entities") == 1
        assert value(det, "osad_errors_total", kind="decode") == 1
        thr = opened.threshold
        assert value(al, "osad_alerter_threshold", entity=e, host="h1", model="cs-jumpstarter") == thr
        judged = phase1[20:]  # the first 20 calibrate the threshold
        ratios = [s.score / thr for s in judged]
        assert value(al, "osad_alerter_score_ratio_count") == len(judged)
        assert value(al, "osad_alerter_score_ratio_bucket", le="1.0") == sum(r <= 1.0 for r in ratios)
        [(labels, max_ratio)] = [(lab, v) for n, lab, v in al if n == "osad_alerter_incident_max_ratio"]
        assert max_ratio == pytest.approx(max(ratios), rel=1e-9)
        assert labels == {"service": "alerter", "entity": e, "host": "h1", "scope": "entity",
                          "severity": severity_of(max(ratios))}
        assert value(al, "osad_alerter_open_incidents") == 1
        assert value(al, "osad_alerter_incidents_opened_total", severity=opened.severity, scope="entity") == 1
        assert value(al, "osad_alerter_incidents_opened_total") == 1

        # -- back to normal: the incident closes --------------------------------------------------------------
        produce(broker, SAMPLES.full_name(topic_prefix), [sample(e, i, spike=False) for i in range(340, 400)])
        scores.read_until(last_seq_scored(399), 180, "the windows up to sample 399 to be scored")
        every = sorted(scores.messages(), key=lambda s: s.window_end_seq)
        wait_until(alerter_judged(len(every)), 60, what="the alerter to judge every Score")
        anomalies.read_until(lambda r: any(a.status == "closed" for a in anomalies.messages()), 60,
                             "the incident to close")
        states = anomalies.messages()
        wait_until(lambda: metric(ports["alerter"], "osad_alerter_sink_total", result="sent") == len(states), 60,
                   what="the anomalies to reach the JSONL sink")
        wait_until(lambda: metric(ports["alerter"], "osad_alerter_open_incidents") == 0, 60,
                   what="the open incidents gauge to drop to 0")
        wait_until(lambda: (metric(ports["collector"], "osad_collector_samples_total") or 0) > 0, 60,
                   what="the collector to publish a Sample")
        served = {name: scrape(port) for name, port in ports.items()}
    finally:
        for name in ("collector", "featurizer", "detector", "alerter"):
            assert procs[name].terminate() == 0, procs[name].text()[-3000:]
        scores.close()
        anomalies.close()

    det, al, fz = served["detector"], served["alerter"], served["featurizer"]
    closed = states[-1]
    assert closed.status == "closed" and {a.anomaly_id for a in states} == {opened.anomaly_id}
    assert value(det, "osad_detector_last_score", entity=e, model="cs-jumpstarter") == every[-1].score
    assert value(det, "osad_detector_score_count") == len(every)
    assert value(al, "osad_alerter_threshold", entity=e, model="cs-jumpstarter") == thr  # fixed once calibrated
    assert value(al, "osad_alerter_incident_max_ratio") is None
    assert value(al, "osad_alerter_open_incidents") == 0
    assert value(al, "osad_alerter_incidents_closed_total", severity=closed.severity, scope="entity") == 1
    assert value(al, "osad_alerter_incidents_closed_total") == 1
    for status in ("open", "update", "closed"):
        assert (value(al, "osad_alerter_anomalies_total", status=status) or 0) == \
            sum(a.status == status for a in states)
    assert value(fz, "osad_messages_in_total") == 400
    assert value(fz, "osad_messages_out_total", topic=SIGNATURES.name) == len(every)

    # -- every metric of every dashboard and rule expression is served ------------------------------------------
    samples = while_open + [s for got in served.values() for s in got]
    names = {n for n, _, _ in samples}
    exprs = {"dashboard": dashboard_exprs(), "rules": rules_exprs()}
    for where, es in exprs.items():
        for expr in es:
            missing = promql_metric_names(expr) - names - PROMETHEUS_OWN
            assert not missing, f"{where}: {expr!r} uses {sorted(missing)}, which no service serves"
            for name, eq in promql_selectors(expr):
                if name in PROMETHEUS_OWN:
                    continue
                assert any(n == name and all(lab.get(k) == v for k, v in eq.items()) for n, lab, _ in samples), \
                    f"{where}: {expr!r}: no series {name}{eq} is served"
    used = set().union(*(promql_metric_names(x) for es in exprs.values() for x in es))
    assert len(used) >= 25  # the parse found the names (an empty parse would pass the loop above)
