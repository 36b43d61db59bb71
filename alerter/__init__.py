"""The alerter: Scores -> Anomalies (thresholds, debounced incidents, root cause, storage, sinks).

* :mod:`alerter.core`: the pure logic (no Kafka, no database): per-stream thresholds, incidents,
  severity, root cause. Tested on its own.
* :mod:`alerter.store`: SQLite / PostgreSQL storage of anomalies and of the state a restart needs.
* :mod:`alerter.sinks`: webhook (background, retries, bounded queue) and JSONL file.
* :mod:`alerter.service`: the thin Transform between ``osad.scores`` and ``osad.anomalies``.
* :mod:`alerter.cli`: ``osad alert``, ``osad anomalies list|show``, ``osad tail``.

See docs/alerter.md for the rules.
"""
