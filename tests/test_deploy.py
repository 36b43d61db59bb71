"""docker-compose.yml and the Dockerfiles, checked offline (no Docker engine here)."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from tests.deployutil import image_text, last

SCALABLE = {"featurizer", "detector", "detector-gpu", "alerter"}


def compose_bin():
    for c in (["docker-compose"], ["docker", "compose"]):
        if shutil.which(c[0]):
            r = subprocess.run(c + ["version"], capture_output=True)
            if r.returncode == 0:
                return c
    pytest.skip("no docker-compose client installed (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_docker_compose_config_accepts_the_file():
    r = subprocess.run(compose_bin() + ["-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(compose_bin() + ["-f", str(ROOT / "docker-compose.yml"), "--profile", "gpu", "config", "-q"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_services_and_their_shape(compose):
    s = compose["services"]
    assert {"kafka", "topics", "collector", "featurizer", "detector", "alerter"} <= set(s)
    assert "apache/kafka" in s["kafka"]["image"] and "healthcheck" in s["kafka"]
    assert "broker,controller" in s["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, single node
    for name in SCALABLE:
        assert "container_name" not in s[name], f"{name} is scalable: no container_name"
        assert "ports" not in s[name], f"{name} is scalable: no fixed host port"
    col = s["collector"]
    # named capabilities, never privileged (refused by hardened engines, and more than eBPF needs)
    assert "privileged" not in col and col.get("pid") == "host"
    assert set(col["cap_add"]) == {"SYS_ADMIN", "SYS_PTRACE"}
    assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(col["security_opt"])
    assert all("privileged" not in svc for svc in s.values())
    mounts = {v.split(":")[1]: v.split(":")[-1] for v in col["volumes"]}
    assert mounts["/lib/modules"] == "ro" and mounts["/usr/src"] == "ro" and mounts["/sys/kernel/tracing"] == "ro"
    # the GPU reservation is opt-in: only in the gpu profile
    assert "deploy" not in s["detector"]
    assert s["detector-gpu"]["profiles"] == ["gpu"]
    dev = s["detector-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["capabilities"] == ["gpu"]


def test_topic_creation_gives_partitions_for_scaling(compose):
    cmd = "\n".join(compose["services"]["topics"]["command"])
    parts = dict(re.findall(r"(osad\.\w+):(\d+)", cmd))
    assert int(parts["osad.samples"]) >= 12 and int(parts["osad.signatures"]) >= 12
    from osad.schemas import ALL_TOPICS
    assert set(parts) == {t.name for t in ALL_TOPICS}


def test_each_service_has_an_image_whose_command_exists(compose):
    from osad.cli import available_commands

    have = available_commands()
    built = [name for name, svc in compose["services"].items() if "build" in svc]
    assert built and all(compose["services"][n]["build"].get("target") for n in built)
    for name in built:
        text = image_text(compose["services"][name])
        assert text, f"{name}: the Dockerfile has no stage {compose['services'][name]['build']['target']}"
        cmd = last(r'^ENTRYPOINT \["osad", "([\w-]+)"\]', text)
        assert cmd in have, f"{name} runs `osad {cmd}`, which does not exist"
        for pkg in ("osad", "schemas", "runtime", "core", "collector", "featurizer", "detector", "alerter"):
            assert f"COPY {pkg} {pkg}" in text, f"{name}: the image must copy {pkg} (osad installs as one namespace)"

def test_healthchecks_follow_the_configured_metrics_port(compose, tmp_path):
    """Every image's healthcheck asks the service on the port it serves (OSAD_METRICS_PORT, or the one it
    wrote to OSAD_METRICS_PORT_FILE), never a fixed 9400; checked against a real status server."""
    from osad.healthcheck import served_port
    from osad.runtime.broker import free_port
    from osad.runtime.http import StatusServer
    from osad.runtime.metrics import ServiceMetrics

    for name, svc in compose["services"].items():
        text = image_text(svc)
        if not text:
            continue
        hc = last(r"^HEALTHCHECK .*", text)
        assert hc and "osad.healthcheck" in hc and "9400" not in hc, f"{name}: {hc}"
    # the port file wins over the variable, and a taken port moves the server up within its span
    taken = StatusServer(free_port(), ServiceMetrics("a"), lambda: (True, {})).start()
    f = tmp_path / "port"
    try:
        moved = StatusServer(taken.port, ServiceMetrics("b"), lambda: (True, {"who": "b"}), span=50,
                             port_file=str(f)).start()
        try:
            assert moved.port != taken.port and f.read_text().strip() == str(moved.port)
            env = {"OSAD_METRICS_PORT": str(taken.port), "OSAD_METRICS_PORT_FILE": str(f)}
            assert served_port(env) == moved.port
            p = subprocess.run([sys.executable, "-m", "osad.healthcheck"], env=dict(os.environ, **env),
                               capture_output=True, text=True)
            assert p.returncode == 0, p.stderr
        finally:
            moved.stop()
        assert not f.exists()  # a stopped server leaves no stale port behind
        env = {"OSAD_METRICS_PORT": str(taken.port), "OSAD_METRICS_PORT_FILE": str(f)}
        p = subprocess.run([sys.executable, "-m", "osad.healthcheck"], env=dict(os.environ, **env),
                           capture_output=True, text=True)
        assert p.returncode == 1 and "not written yet" in p.stderr
        assert served_port({"OSAD_METRICS_PORT": str(taken.port)}) == taken.port
    finally:
        taken.stop()
