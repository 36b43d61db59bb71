"""The wire format: the only place that turns messages into bytes and back.

* Sample, Score, Anomaly: UTF-8 JSON objects (pydantic's JSON), readable by any Kafka client.
* SignatureWindow: a binary frame, because it is mostly float32 matrices::

      0   4  magic b"OSW" + frame version (1)
      4   4  H = header length, uint32 little-endian
      8   H  header: UTF-8 JSON of every field except the arrays
      8+H    signatures: float32 LE, [step, S, N(N+1)/2]: the upper triangle (diagonal included) of
             each symmetric N x N matrix, row by row (numpy.triu_indices order)
      ...    values: float32 LE, [max(scales), N], oldest row first

  For N = 38 features, S = 3 scales, step = 5: 5*3*741*4 = 44,460 bytes of matrices, 60*38*4 =
  9,120 bytes of values, plus a header of about 0.8 kB: about 54 kB per window (a full float32
  tensor as JSON would be over 400 kB). ``window_nbytes`` computes it.

Decoding never trusts lengths: any mismatch raises :class:`WireError`, which services route to
the dead-letter topic.
"""

from __future__ import annotations

import json
import struct
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from .messages import Anomaly, Sample, Score, SignatureWindow
from .triangles import pack_symmetric, unpack_symmetric

#: the largest message osad's clients send or fetch (a Kafka broker's ``message.max.bytes`` must allow it)
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

_MAGIC = b"OSW\x01"
_HDR = struct.Struct("<4sI")

M = TypeVar("M", bound=BaseModel)


class WireError(ValueError):
    """A message could not be decoded or validated. The text says what was wrong."""


def window_nbytes(n_features: int, n_scales: int = 3, step: int = 5, max_scale: int = 60) -> int:
    """Bytes of a SignatureWindow's arrays (header excluded)."""
    return 4 * (step * n_scales * n_features * (n_features + 1) // 2 + max_scale * n_features)


def encode(msg: BaseModel) -> bytes:
    if isinstance(msg, SignatureWindow):
        return _encode_window(msg)
    return msg.model_dump_json().encode()


def decode(data: bytes | None, model: type[M]) -> M:
    """Bytes -> a validated ``model`` instance, or WireError saying why not."""
    if data is None:
        raise WireError("message has no value (tombstone); expected a " + model.__name__)
    if model is SignatureWindow:
        return _decode_window(data)  # type: ignore[return-value]
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        raise WireError(f"not a valid {model.__name__}: {_short(e)}") from None


def _short(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(x) for x in err["loc"]) or "(message)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{e.error_count() - 3} more)" if e.error_count() > 3 else ""
    return "; ".join(parts) + more


def _encode_window(w: SignatureWindow) -> bytes:
    header = w.model_dump(exclude={"tri", "values"})
    header["step"] = w.step
    hb = json.dumps(header, separators=(",", ":")).encode()
    tri = np.ascontiguousarray(w.tri, dtype="<f4")
    vals = np.ascontiguousarray(w.values, dtype="<f4")
    return b"".join((_HDR.pack(_MAGIC, len(hb)), hb, tri.tobytes(), vals.tobytes()))


def _decode_window(data: bytes) -> SignatureWindow:
    if len(data) < _HDR.size or data[:4] != _MAGIC:
        raise WireError("not a SignatureWindow frame (bad magic); was it produced by osad's featurizer?")
    _, hlen = _HDR.unpack_from(data)
    if _HDR.size + hlen > len(data):
        raise WireError(f"SignatureWindow header length {hlen} exceeds the message ({len(data)} bytes)")
    try:
        header = json.loads(data[_HDR.size:_HDR.size + hlen])
        if not isinstance(header, dict):
            raise TypeError(f"expected a JSON object, got {type(header).__name__}")
        if "tri" in header or "values" in header:
            raise KeyError("the arrays (tri, values) follow the header, they are not in it")
        step = int(header.pop("step"))
        n = len(header["features"])
        s = len(header["scales"])
        t = max(int(x) for x in header["scales"])
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:  # inf as an int; nesting too deep
        raise WireError(f"SignatureWindow header is not valid: {type(e).__name__}: {e}") from None
    if step < 1 or n < 1 or t < 1:
        raise WireError(f"SignatureWindow header has step={step}, features={n}, max scale={t}")
    ntri = step * s * n * (n + 1) // 2
    expect = _HDR.size + hlen + 4 * (ntri + t * n)
    if len(data) != expect:
        raise WireError(f"SignatureWindow is {len(data)} bytes; its header implies {expect}")
    off = _HDR.size + hlen
    tri = np.frombuffer(data, dtype="<f4", count=ntri, offset=off).reshape(step, s, -1)
    vals = np.frombuffer(data, dtype="<f4", count=t * n, offset=off + 4 * ntri).reshape(t, n)
    try:
        return SignatureWindow(**header, tri=tri.astype(np.float32), values=vals.astype(np.float32))
    except ValidationError as e:
        raise WireError(f"not a valid SignatureWindow: {_short(e)}") from None


__all__ = ["WireError", "encode", "decode", "pack_symmetric", "unpack_symmetric", "window_nbytes",
           "Sample", "Score", "Anomaly", "SignatureWindow"]
