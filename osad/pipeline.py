"""The pipeline, declared once: which services, in which order, between which topics, with which arguments.

Everything that runs the services reads this: ``osad up`` (all of them on this machine), ``osad agreement``
(the transforms, on a replay), bench/pipeline.py (the transforms, fed by the benchmark), and
tests/test_pipeline_decl.py checks docker-compose.yml against it.

* :data:`PIPELINE` lists the services in start order: the transforms in data-flow order, each reading
  what the one before it publishes, then the source (the collector), so that nothing is sampled before
  the services that score it run; they are stopped in reverse.
* A service's arguments may name ``{state}``, the folder for its state (``osad up --state-dir``; a
  container's volume at ``/var/lib/osad``).
* Metrics: in a container every service serves ``/metrics`` and ``/healthz`` on :data:`METRICS_PORT`;
  on one machine (``osad up``) the services started get consecutive ports from a base
  (:func:`metrics_ports`).

>>> [s.name for s in PIPELINE]
['featurizer', 'detector', 'alerter', 'collector']
>>> command_line(DETECTOR, state="var", bootstrap="k:9092", metrics_port=9401, python="py")[:10]
['py', '-m', 'osad', 'detect', '--bootstrap', 'k:9092', '--topic-prefix', '', '--metrics-port', '9401']
>>> DETECTOR.arguments("var")
['--models', 'var/models', '--state-dir', 'var/detector']
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from osad.schemas import ANOMALIES, SAMPLES, SCORES, SIGNATURES, Topic

#: where each service serves /metrics and /healthz in its container, and osad up's first port
METRICS_PORT = 9400
#: the services' state folder in their containers (docker-compose.yml's volumes)
CONTAINER_STATE = "/var/lib/osad"


@dataclass(frozen=True)
class Service:
    """One service of the pipeline."""

    name: str  # its name: docker-compose service, log file, ``osad up --only``
    command: str  # the osad subcommand that runs it
    input: Topic | None  # the topic it consumes (None: a source, it watches the host)
    outputs: tuple[Topic, ...]  # the topics it publishes to (dead letters aside)
    args: tuple[str, ...] = ()  # its arguments; {state} is the state folder
    needs_root: bool = False  # loads eBPF programs: root (or CAP_BPF and CAP_PERFMON), the host's pid namespace
    variants: tuple[str, ...] = ()  # other docker-compose services that run it differently (a GPU replica)

    @property
    def is_source(self) -> bool:
        return self.input is None

    def arguments(self, state: str) -> list[str]:
        """Its arguments for the state folder ``state``.

        >>> ALERTER.arguments("/srv")
        ['--store', 'sqlite:////srv/alerter/anomalies.db']
        """
        return [a.format(state=state) for a in self.args]

    def value(self, flag: str, state: str) -> str:
        """The value its arguments give ``flag`` (KeyError when they do not set it)."""
        args = self.arguments(state)
        for i, a in enumerate(args[:-1]):
            if a == flag:
                return args[i + 1]
        raise KeyError(f"{self.name}: its arguments do not set {flag}")

    def flags(self) -> list[str]:
        """The flags its arguments set (``--store``, ``--all``, ...)."""
        return [a for a in self.args if a.startswith("--")]


FEATURIZER = Service("featurizer", "featurizer", SAMPLES, (SIGNATURES,), ("--state-dir", "{state}/featurizer"))
DETECTOR = Service("detector", "detect", SIGNATURES, (SCORES,), ("--models", "{state}/models",
                                                                 "--state-dir", "{state}/detector"),
                   variants=("detector-gpu",))
ALERTER = Service("alerter", "alert", SCORES, (ANOMALIES,), ("--store", "sqlite:///{state}/alerter/anomalies.db"))
COLLECTOR = Service("collector", "collect", None, (SAMPLES,), ("--all",), needs_root=True)

#: every service, in start order (stopped in reverse)
PIPELINE: tuple[Service, ...] = (FEATURIZER, DETECTOR, ALERTER, COLLECTOR)
#: the services that read a topic (what a replay or a benchmark feeds instead of the collector)
TRANSFORMS: tuple[Service, ...] = tuple(s for s in PIPELINE if not s.is_source)


def names() -> list[str]:
    return [s.name for s in PIPELINE]


def by_name(name: str) -> Service:
    for s in PIPELINE:
        if s.name == name:
            return s
    raise KeyError(f"no service {name!r}; the pipeline has {', '.join(names())}")


def metrics_ports(services: Iterable[Service], base: int) -> dict[str, int]:
    """Ports for the services that are started on one machine: consecutive from ``base``, in start order.

    >>> metrics_ports([FEATURIZER, ALERTER], 9400)
    {'featurizer': 9400, 'alerter': 9401}
    """
    return {s.name: base + i for i, s in enumerate(services)}


def osad(*args: str, python: str | None = None) -> list[str]:
    """The command line that runs ``osad ARGS`` with this interpreter (or ``python``)."""
    return [python or sys.executable, "-m", "osad", *args]


def connection(bootstrap: str, prefix: str, security=None) -> list[str]:
    """The arguments that put a command on the broker ``bootstrap``, its topics named with ``prefix``, its
    clients secured by ``security`` (a ``KafkaSecurity``: its flags, passwords given as values left out;
    None: none)."""
    return ["--bootstrap", bootstrap, "--topic-prefix", prefix, *(security.to_args() if security else [])]


def override(base: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``base`` arguments with the ``--flag value`` pairs of ``flags`` replacing (or added to) its own.

    >>> override(["--store", "a", "--x"], ["--store", "b", "--n", "1"])
    ['--x', '--store', 'b', '--n', '1']
    """
    replaced = set(flags[::2])
    out, skip = [], False
    for a in base:
        if skip:
            skip = False
        elif a in replaced:
            skip = True
        else:
            out.append(a)
    return out + list(flags)


def service_args(service: Service, *, state: str, bootstrap: str, prefix: str = "", metrics_port: int | None = None,
                 overrides: Sequence[str] = (), args: Sequence[str] | None = None,
                 extra: Sequence[str] = (), security=None) -> list[str]:
    """The ``osad`` arguments that run ``service``: on ``bootstrap`` with topic prefix ``prefix``, serving
    metrics on ``metrics_port`` (None: not given), with its declared arguments for ``state`` (or ``args``
    instead), ``overrides`` (``--flag value`` pairs) replacing theirs, then ``extra`` as they are;
    ``security``: the Kafka TLS / SASL settings (a ``KafkaSecurity``), see :func:`connection`."""
    base = service.arguments(state) if args is None else list(args)
    port = ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
    return [service.command, *connection(bootstrap, prefix, security), *port, *override(base, overrides), *extra]


def command_line(service: Service, *, python: str | None = None, **kw) -> list[str]:
    """The command line that runs ``service`` (the arguments of :func:`service_args`) with this interpreter."""
    return osad(*service_args(service, **kw), python=python)
