"""Where messages go besides a topic: the one base of the collector's and the alerter's outputs.

A :class:`Sink` takes osad messages (``write`` a list, or ``send`` one), counts what it did in
``counts`` (``sent``, ``failed``, ``dropped``, ...), and is flushed and closed by its owner.
:class:`JsonlSink` writes each message as one line of its wire JSON (``osad.schemas.encode``),
so a file recorded by the collector or the alerter reads back with ``osad.schemas.decode``.
Sinks that talk to the network (the alerter's webhooks) must never block their caller.

Example::

    >>> import io, tempfile, os
    >>> from osad.schemas import Sample
    >>> path = os.path.join(tempfile.mkdtemp(), "s.jsonl")
    >>> s = JsonlSink(path)
    >>> s.send(Sample(entity_id="h/1@2", host="h", pid=1, comm="c", ts=1.0, interval_s=1.0, seq=0, metrics={}))
    >>> s.close(); s.counts["sent"], open(path).read().count("\\n")
    (1, 1)
"""

from __future__ import annotations

import collections
import logging
import sys
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel

log = logging.getLogger("osad.sinks")


class SinkError(ValueError):
    """A sink is misconfigured; the text says what to fix."""


class Sink:
    name = "sink"

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def write(self, msgs: Sequence[BaseModel]) -> None:
        for m in msgs:
            self.send(m)

    def send(self, msg: BaseModel) -> None:
        self.write([msg])

    def flush(self) -> None:
        pass

    def close(self, timeout_s: float = 5.0) -> None:
        pass


class FileSink(Sink):
    """A sink that writes to a file it opens (``-``: standard output, which it never closes).

    ``binary``: bytes (else text, with ``newline`` as ``open`` takes it); ``append``: add to an existing
    file; ``what``: the option that named the path, for the error message."""

    def __init__(self, path: str, kind: str, *, binary: bool = True, append: bool = False, newline: str | None = None,
                 what: str = "--output"):
        super().__init__()
        self.name = f"{kind}:{path}"
        if path == "-":
            self.fh, self._own = (sys.stdout.buffer if binary else sys.stdout), False
            return
        mode = ("a" if append else "w") + ("b" if binary else "")
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, mode) if binary else open(path, mode, encoding="utf-8", newline=newline)
            self._own = True
        except OSError as e:
            raise SinkError(f"{what}{path if what.endswith(':') else ' ' + path}: cannot open for writing: {e}") from None

    def flush(self) -> None:
        self.fh.flush()

    def close(self, timeout_s: float = 5.0) -> None:
        self.fh.flush()
        if self._own:
            self.fh.close()


class JsonlSink(FileSink):
    """One message per line, as on the wire. ``path`` ``-`` is standard output.

    ``append``: add to an existing file instead of replacing it; ``flush_each``: flush after every
    write (a file someone tails while it grows)."""

    def __init__(self, path: str, *, append: bool = False, flush_each: bool = False, what: str = "--output"):
        super().__init__(path, "jsonl", append=append, what=what)
        self.flush_each = flush_each

    def write(self, msgs: Sequence[BaseModel]) -> None:
        from osad.schemas import encode

        try:
            self.fh.write(b"".join(encode(m) + b"\n" for m in msgs))
            if self.flush_each:
                self.fh.flush()
            self.counts["sent"] += len(msgs)
        except OSError as e:
            self.counts["failed"] += len(msgs)
            log.error("%s: write failed: %s", self.name, e)
