"""The pipeline is declared once (osad/pipeline.py): docker-compose.yml agrees with it, and `osad up`,
`osad agreement` and bench/pipeline.py render their services from it. Offline: no broker, no Docker."""

from __future__ import annotations

import ast
import doctest
import re
from types import SimpleNamespace

import pytest
import yaml

import osad.pipeline as pipeline
from osad.pipeline import (ALERTER, COLLECTOR, FEATURIZER, METRICS_PORT, PIPELINE, TRANSFORMS, command_line,
                           connection, metrics_ports, osad, service_args)
from osad.runtime.config import env_name
from tests.conftest import ROOT
from tests.deployutil import image_text, last

INFRA = {"kafka", "topics"}  # compose services that are not osad's
_ENTRY = re.compile(r'^ENTRYPOINT \["osad", "([\w-]+)"\]', re.M)
_HEALTH_URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost):(\d+)/healthz")


def test_docstring_examples():
    assert doctest.testmod(pipeline).failed == 0


# -- the declaration itself ------------------------------------------------------------------------

def test_the_declaration_is_a_chain_of_transforms_then_the_source():
    from osad.schemas import ALL_TOPICS

    assert len({s.name for s in PIPELINE}) == len(PIPELINE)
    assert [s for s in PIPELINE if s.is_source] == [COLLECTOR] == list(PIPELINE[len(TRANSFORMS):])
    for before, after in zip(TRANSFORMS, TRANSFORMS[1:]):
        assert after.input in before.outputs, f"{after.name} does not read what {before.name} publishes"
    assert TRANSFORMS[0].input in COLLECTOR.outputs  # the source feeds the first transform
    for s in PIPELINE:
        assert {t.name for t in (s.input, *s.outputs) if t} <= {t.name for t in ALL_TOPICS}
    assert [s.name for s in PIPELINE if s.needs_root] == ["collector"]


def test_every_declared_command_and_flag_exists():
    """Each service's osad subcommand is there, and so is every flag its arguments (and the connection) use."""
    import argparse

    from osad.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for s in PIPELINE:
        assert s.command in sub.choices, f"{s.name}: osad {s.command} does not exist"
        flags = {o for a in sub.choices[s.command]._actions for o in a.option_strings}
        for f in s.flags() + ["--bootstrap", "--topic-prefix", "--metrics-port"]:
            assert f in flags, f"{s.name}: osad {s.command} has no {f}"


def test_command_lines_are_rendered_from_the_declaration():
    cmd = command_line(ALERTER, state="/s", bootstrap="k:1", prefix="p.", metrics_port=7, python="py",
                       overrides=["--store", "x", "--q", "0.1"], extra=["--verbose"])
    assert cmd == ["py", "-m", "osad", "alert", "--bootstrap", "k:1", "--topic-prefix", "p.", "--metrics-port", "7",
                   "--store", "x", "--q", "0.1", "--verbose"]
    assert service_args(COLLECTOR, state="/s", bootstrap="k:1", args=["--pid", "1"]) == [
        "collect", "--bootstrap", "k:1", "--topic-prefix", "", "--pid", "1"]
    assert FEATURIZER.value("--state-dir", "/s") == "/s/featurizer"
    with pytest.raises(KeyError):
        FEATURIZER.value("--store", "/s")
    assert metrics_ports(PIPELINE, 9400) == {"featurizer": 9400, "detector": 9401, "alerter": 9402, "collector": 9403}


# -- docker-compose.yml against the declaration ----------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile(svc: dict) -> str:
    return image_text(svc)


def _osad_command(svc: dict) -> str | None:
    """The osad subcommand a compose service runs (its entrypoint, else its Dockerfile's), or None."""
    ep = svc.get("entrypoint")
    if isinstance(ep, str):
        ep = ep.split()
    if ep:
        return ep[1] if ep[0] == "osad" and len(ep) > 1 else None
    return last(_ENTRY.pattern, _dockerfile(svc))


def _declared_for(compose_name: str):
    for s in PIPELINE:
        if compose_name == s.name or compose_name in s.variants:
            return s
    return None


def _depends(svc: dict) -> list[str]:
    d = svc.get("depends_on") or []
    return list(d) if isinstance(d, (list, dict)) else [d]


def test_compose_runs_every_declared_service_and_no_other(compose):
    services = compose["services"]
    for s in PIPELINE:
        assert s.name in services, f"docker-compose.yml has no service {s.name}"
        for name in (s.name, *s.variants):
            assert _osad_command(services[name]) == s.command, f"{name} must run `osad {s.command}`"
    for name, svc in services.items():
        cmd = _osad_command(svc)
        if cmd is None:
            assert name in INFRA, f"{name}: neither an osad service nor known infrastructure"
            continue
        decl = _declared_for(name)
        assert decl is not None, f"docker-compose.yml runs `osad {cmd}` as {name}, which osad/pipeline.py lacks"
        assert cmd == decl.command


def test_compose_metrics_ports_and_healthchecks_match(compose):
    for name, svc in compose["services"].items():
        decl = _declared_for(name)
        if decl is None:
            continue
        df = _dockerfile(svc)
        env = svc.get("environment") or {}
        assert str(env.get("OSAD_METRICS_PORT")) == str(METRICS_PORT), f"{name}: OSAD_METRICS_PORT"
        assert re.search(rf"^EXPOSE {METRICS_PORT}$", df, re.M), f"{name}: its Dockerfile must EXPOSE {METRICS_PORT}"
        checks = [m for m in re.findall(r"^HEALTHCHECK .*$", df, re.M)]
        if "healthcheck" in svc:
            checks.append(" ".join(map(str, svc["healthcheck"].get("test", []))))
        assert checks, f"{name}: no health check"
        for text in checks:  # the image's check follows the served port (osad.healthcheck); a fixed URL must be it
            ports = _HEALTH_URL.findall(text)
            assert "osad.healthcheck" in text or (ports and set(ports) == {str(METRICS_PORT)}), \
                f"{name}: its health check must ask the service's metrics port ({METRICS_PORT}) for /healthz: {text}"


def test_compose_start_order_follows_the_declaration(compose):
    order = {s.name: i for i, s in enumerate(PIPELINE)}
    for name, svc in compose["services"].items():
        decl = _declared_for(name)
        if decl is None:
            continue
        for dep in _depends(svc):
            if dep in INFRA:
                continue
            other = _declared_for(dep)
            assert other is not None and order[other.name] < order[decl.name], \
                f"{name} depends on {dep}, which the declaration starts after it"


def test_compose_gives_each_service_its_declared_arguments_and_privileges(compose):
    for name, svc in compose["services"].items():
        decl = _declared_for(name)
        if decl is None:
            continue
        command = svc.get("command") or []
        command = command.split() if isinstance(command, str) else [str(c) for c in command]
        env = set(svc.get("environment") or {}) | set(re.findall(r"\b(OSAD_\w+)=", _dockerfile(svc)))
        for flag in decl.flags():
            assert flag in command or env_name(flag) in env, \
                f"{name}: docker-compose.yml sets neither {flag} nor {env_name(flag)}"
        rooted = bool(svc.get("privileged")) or "SYS_ADMIN" in (svc.get("cap_add") or [])
        assert rooted == decl.needs_root, f"{name}: privileges differ from the declaration (needs_root)"
        if decl.needs_root:
            assert svc.get("pid") == "host"
        else:
            assert re.search(r"^USER ", _dockerfile(svc), re.M), f"{name} needs no root: its image drops it"


# -- the users of the declaration ------------------------------------------------------------------

def test_up_plans_the_declared_services(tmp_path):
    from osad.up import DEMO_ARGS, UpConfig, plan

    have = {s.command for s in PIPELINE} | {"replay"}
    cfg = UpConfig(state_dir="st", log_dir=str(tmp_path), metrics_base_port=9500, topic_prefix="p.")
    kids = plan(cfg, "k:1", have)
    ports = metrics_ports(PIPELINE, 9500)
    assert [c.name for c in kids] == [s.name for s in PIPELINE]
    for c, s in zip(kids, PIPELINE):
        assert c.port == ports[s.name]
        assert c.cmd == command_line(s, state="st", bootstrap="k:1", prefix="p.", metrics_port=ports[s.name])
    assert UpConfig().collect_args == " ".join(COLLECTOR.args)
    # --only and a missing command leave services out; the ports stay consecutive in start order
    kids = plan(UpConfig(only=["alerter", "featurizer", "collector"], log_dir=str(tmp_path)), "k:1",
                have - {"collect"})
    assert [(c.name, c.port) for c in kids] == [("featurizer", METRICS_PORT), ("alerter", METRICS_PORT + 1)]
    # demo: no source; the demo's settings replace the declared ones
    from osad.up import DemoPlan

    demo = DemoPlan("D", "m", "D/m", 100, 10, 0, [(5, 6)], 20.0)
    kids = plan(UpConfig(state_dir="st", log_dir=str(tmp_path)), "k:1", have, demo)
    assert [c.name for c in kids] == [s.name for s in TRANSFORMS] + ["replay-train", "replay-test"]
    alerter = kids[[s.name for s in TRANSFORMS].index("alerter")].cmd
    assert alerter.count("--store") == 1 and alerter[alerter.index("--store") + 1] == "sqlite:///st/demo/anomalies.db"
    assert set(DEMO_ARGS) <= {s.name for s in TRANSFORMS}
    for c in kids[-2:]:
        assert c.cmd[:5] == osad("replay", "D") and c.cmd[5:9] == connection("k:1", "")


def test_agreement_runs_the_declared_transforms(tmp_path):
    from osad.agreement import AgreementConfig, make_plan, replay_args, service_commands

    plan = make_plan(23688, 23689, 5000, 6000, gap=10, need=100, val_fraction=0.2)
    cmds = service_commands(plan, tmp_path, "k:1", "agree1.", q=0.01, fence=3.0)
    assert list(cmds) == [s.name for s in TRANSFORMS]
    for s in TRANSFORMS:
        cmd = cmds[s.name]
        assert cmd[:3] == osad()[:3] and cmd[3] == s.command and cmd[4:8] == connection("k:1", "agree1.")
        for flag in s.flags():  # the declared arguments, for the work folder, unless the protocol sets them
            assert flag in cmd
    assert cmds["detector"][cmds["detector"].index("--models") + 1] == str(tmp_path / "models")
    assert cmds["detector"][cmds["detector"].index("--cs-calibrate") + 1] == str(plan.fit_windows)
    alerter = cmds["alerter"]
    assert alerter[alerter.index("--store") + 1] == ALERTER.value("--store", str(tmp_path))
    assert alerter[alerter.index("--calibration-scores") + 1] == str(plan.val_windows)
    cfg = AgreementConfig(dir="D", entity="m")
    assert replay_args(cfg, plan, "k:1", "agree1.")[:6] == ["replay", "D", *connection("k:1", "agree1.")]


def test_bench_pipeline_runs_the_declared_transforms(tmp_path):
    from bench.pipeline import service_commands, service_env

    a = SimpleNamespace(feat_calibration=100, cs_calibrate=10, alert_calibration=30, featurizer_arg=[],
                        detect_arg=["--max-batch", "8"], alert_arg=[], env=["OMP_NUM_THREADS=1"])
    ports = {s.name: 10_000 + i for i, s in enumerate(TRANSFORMS)}
    cmds = service_commands(a, tmp_path, "k:1", "bench1.", ports)
    assert list(cmds) == [s.name for s in TRANSFORMS]
    for s in TRANSFORMS:
        assert cmds[s.name][:5] == [s.command, *connection("k:1", "bench1.")]
        assert cmds[s.name][5:7] == ["--metrics-port", str(ports[s.name])]
    assert cmds["detector"][-2:] == ["--max-batch", "8"]
    assert cmds["featurizer"][cmds["featurizer"].index("--state-dir") + 1] == str(tmp_path / "featurizer")
    assert service_env(a)["OMP_NUM_THREADS"] == "1"


USERS = ("osad/up.py", "osad/agreement.py", "bench/pipeline.py")


def _constants(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


@pytest.mark.parametrize("path", USERS)
def test_users_keep_no_list_of_services_of_their_own(path):
    """No user of the declaration names a service's subcommand or its declared arguments itself."""
    consts = _constants(path)
    commands = {s.command for s in PIPELINE if s.command != s.name}  # detect, alert, collect
    assert not consts & commands, f"{path} names {consts & commands}: take them from osad.pipeline"
    for s in PIPELINE:  # (a flag may appear in an override; the declared values may not)
        declared = {a for a in s.args if "{state}" in a}
        assert not consts & declared, f"{path} spells {s.name}'s declared arguments: take them from osad.pipeline"


@pytest.mark.parametrize("path", USERS + ("osad/live.py", "alerter/tail.py", "alerter/report.py", "runtime/reader.py",
                                          "runtime/cli.py", "bench/_common.py"))
def test_no_setting_is_written_into_the_environment(path):
    tree = ast.parse((ROOT / path).read_text())
    bad = []
    for n in ast.walk(tree):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
        for t in targets:
            if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ":
                bad.append(n.lineno)
        if isinstance(n, ast.Call) and ast.unparse(n.func) in ("os.environ.update", "os.environ.setdefault",
                                                               "os.putenv"):
            bad.append(n.lineno)
    assert not bad, f"{path} writes os.environ at lines {bad}: pass the setting explicitly"


def test_bench_pipeline_is_importable_without_touching_sys_path():
    import subprocess
    import sys

    code = "import sys; before = list(sys.path); import bench.pipeline; assert sys.path == before, sys.path"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
