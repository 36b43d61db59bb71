"""`--config FILE`: a command's settings from YAML, beneath the OSAD_* variables and the flags, checked like them.

The issue asks it of the collector (OSdetector had its config.json); it is the same for every command, because
it comes from the one declaration of each setting (runtime/config.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from osad.cli import _config_file, build_parser, main
from osad.collector.config import CollectorConfig
from osad.runtime.config import ConfigError, use_config_file


@pytest.fixture(autouse=True)
def no_config_file_after():
    yield
    use_config_file(None, ())


def collect_cfg(path, *argv) -> CollectorConfig:
    use_config_file(str(path), ("collect",))
    return CollectorConfig.from_args(build_parser().parse_args(["collect", "--config", str(path), *argv]))


def test_every_kind_of_setting_from_the_file(tmp_path):
    f = tmp_path / "collector.yaml"
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    f.write_text("# what OSdetector's config.json held, and more\n"
                 "comm: ^postgres\n"
                 "interval: 0.5\n"
                 "max_processes: 20\n"            # underscores or dashes
                 "probe: [c:malloc, c:free]\n"    # a repeatable option: a list
                 "threads: true\n"                # a switch
                 "bootstrap: kafka-1:9092,kafka-2:9092\n"  # a section's option (KafkaConfig)
                 "security-protocol: SSL\n"
                 f"ssl-ca-file: {ca}\n"
                 "log-level: WARNING\n")
    cfg = collect_cfg(f)
    assert cfg.targets.comm == "^postgres" and cfg.interval_s == 0.5 and cfg.max_processes == 20
    assert [(p.binary, p.function) for p in cfg.probes] == [("c", "malloc"), ("c", "free")]
    assert cfg.per_thread is True
    assert cfg.kafka.bootstrap == "kafka-1:9092,kafka-2:9092"
    assert cfg.kafka.security.security_protocol == "SSL" and cfg.kafka.security.ssl_ca_file == str(ca)
    assert cfg.service.log_level == "WARNING"


def test_variables_win_over_the_file_and_flags_over_both(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("comm: x\ninterval: 0.5\nmax-processes: 20\n")
    monkeypatch.setenv("OSAD_INTERVAL", "2")
    cfg = collect_cfg(f, "--max-processes", "7")
    assert (cfg.interval_s, cfg.max_processes) == (2.0, 7)


@pytest.mark.parametrize("text,message", [
    ("comm: x\nintervall: 0.5\n", "'intervall' is not an option of this command; did you mean interval"),
    ("comm: x\ninterval: -1\n", "c.yaml: interval='-1' is not valid for --interval: must be greater than 0"),
    ("comm: x\ninterval: fast\n", "c.yaml: interval='fast' is not valid for --interval"),
    ("comm: x\ninterval: [1, 2]\n", "'interval' takes one value, not a list"),
    ("comm: x\nthreads: maybe\n", "c.yaml: threads='maybe': give 1 or 0 (for --threads)"),
    ("comm: x\nprobe: [nocolon]\n", "c.yaml: probe='nocolon' is not valid for --probe: write BINARY:FUNCTION"),
    ("- interval: 1\n", "give a mapping of option names to values"),
    ("interval: [1\n", "not valid YAML"),
])
def test_a_wrong_key_or_value_names_the_file_and_the_key(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=None) as e:
        collect_cfg(f)
    assert message in str(e.value), str(e.value)


def test_a_missing_file_is_a_configuration_error_with_exit_2(tmp_path, capsys):
    assert main(["collect", "--config", str(tmp_path / "none.yaml"), "--comm", "x"]) == 2
    err = capsys.readouterr().err
    assert "none.yaml: cannot read it: No such file or directory" in err


def test_the_config_file_is_found_on_the_command_line_or_in_the_environment(monkeypatch):
    assert _config_file(["collect", "--comm", "x", "--config", "a.yaml"]) == ("a.yaml", ("collect",))
    assert _config_file(["anomalies", "list", "--config=b.yaml"]) == ("b.yaml", ("anomalies", "list"))
    monkeypatch.setenv("OSAD_CONFIG", "c.yaml")
    assert _config_file(["detect"]) == ("c.yaml", ("detect",))


def test_the_collector_runs_with_its_settings_from_a_file(tmp_path):
    """End to end: `osad collect --config FILE` samples the command, at the interval and into the output the file
    names."""
    from osad.schemas import Sample, decode

    out = tmp_path / "s.jsonl"
    f = tmp_path / "collector.yaml"
    f.write_text(f"command: sleep 0.6\ninterval: 0.2\noutput: jsonl:{out}\n")
    r = subprocess.run([sys.executable, "-m", "osad", "collect", "--config", str(f)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    samples = [decode(line, Sample) for line in out.read_bytes().splitlines()]
    assert samples and all(s.comm == "sleep" for s in samples), r.stderr
    assert "every 0.2 s -> jsonl:" in r.stderr, r.stderr  # the interval it was given
