"""osad's message contract: models, topics and wire format. The only place that knows them."""

from .messages import SCHEMA_VERSION, SEVERITIES, Anomaly, Severity, severity_rank, DeadLetterInfo, EntityRef, RootCause, Sample, Score, SignatureWindow, WindowHeader
from .topics import ALL as ALL_TOPICS
from .topics import ANOMALIES, DEADLETTER, SAMPLES, SCORES, SIGNATURES, Topic
from .wire import WireError, decode, encode, window_nbytes

__all__ = [
    "SCHEMA_VERSION", "SEVERITIES", "Severity", "severity_rank", "Anomaly", "DeadLetterInfo", "EntityRef", "RootCause", "Sample", "Score", "SignatureWindow",
    "ALL_TOPICS", "ANOMALIES", "DEADLETTER", "SAMPLES", "SCORES", "SIGNATURES", "Topic",
    "WireError", "decode", "encode", "window_nbytes", "json_schemas",
]


def json_schemas() -> dict[str, dict]:
    """JSON Schema of every message model (SignatureWindow's arrays described as binary)."""
    out = {}
    for m in (Sample, Score, Anomaly):
        out[m.__name__] = m.model_json_schema()
    hdr = WindowHeader.model_json_schema()
    hdr["title"] = "SignatureWindow (binary frame header)"
    hdr["description"] = (SignatureWindow.__doc__ or "").strip() + (
        "\n\nOn the wire: a binary frame (schemas/wire.py); this schema is its JSON header, which also "
        "holds 'step'. The float32 arrays follow the header."
    )
    hdr["properties"]["step"] = {"type": "integer", "minimum": 1}
    out["SignatureWindow"] = hdr
    return out
