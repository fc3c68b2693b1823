"""The deployment secured: TLS from a private CA, and SuperNode authentication.

The test makes a CA and a certificate for 127.0.0.1/localhost signed by it, starts a
SuperLink with TLS and ``--enable-supernode-auth``, registers SuperNode public keys with
``flwr supernode register``, and shows that only a SuperNode holding a registered key and
trusting the CA connects: one with an unregistered key, one without a key, and one that
trusts another CA are refused and exit. The pipeline then runs over TLS on the
authenticated node. Every process runs in its own session and is killed by process group,
with whatever it started in sessions of its own.
"""

import contextlib
import datetime
import ipaddress
import json
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.test_deployment import BIN, SHORT, free_port, processes, toml_value, wait_for_port
from tests.test_pipeline import REPO, _env


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def write_ca(path: Path, common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (PEM) at ``path``; returns it with its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def write_server_certificate(
    cert_path: Path, key_path: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    """A server certificate for localhost and 127.0.0.1 (SAN entries), signed by the CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("elora-fed superlink"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)


def write_supernode_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair as Flower reads it: EC (NIST P-384), both halves in OpenSSH format.

    The same as ``ssh-keygen -t ecdsa -b 384 -N "" -f DIR/NAME``.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public


def flwr(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"flwr {' '.join(args)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


def flwr_json(*args: str, env: dict[str, str]) -> dict:
    """What a flwr CLI command prints with ``--format json`` (nothing else goes to stdout then)."""
    answer = json.loads(flwr(*args, "--format", "json", env=env).stdout)
    assert answer["success"], answer
    return answer


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout} s")
        time.sleep(0.5)


@contextlib.contextmanager
def process_trees(log_dir: Path) -> Iterator[Callable[[str, list[str], dict[str, str]], subprocess.Popen]]:
    """``processes``, also killing what the started processes detached, which killing their groups misses.

    The SuperLink starts its ``flower-superexec`` in a session of its own, and that starts
    ``flwr-serverapp``; both only poll for their parent's exit.
    """
    started: list[subprocess.Popen] = []
    with processes(log_dir) as start:

        def start_tracked(name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
            started.append(start(name, cmd, env))
            return started[-1]

        try:
            yield start_tracked
        finally:
            for proc in started:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        with contextlib.suppress(psutil.NoSuchProcess):
                            child.kill()


@pytest.mark.e2e
def test_only_an_authenticated_supernode_trusting_the_ca_joins_and_the_pipeline_runs_over_tls(tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, ca_key = write_ca(pki / "ca.pem", "elora-fed test CA")
    write_server_certificate(pki / "server.pem", pki / "server.key", ca, ca_key)
    write_ca(pki / "other-ca.pem", "some other CA")  # a CA that never signed the SuperLink's certificate
    registered = write_supernode_keys(pki, "node-registered")
    registered_wrong_ca = write_supernode_keys(pki, "node-registered-wrong-ca")
    unregistered = write_supernode_keys(pki, "node-unregistered")

    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink.secure]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{pki / "ca.pem"}"\n'
    )
    # No FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION here: the SuperLink's flag must do it.
    env = {**_env(), "FLWR_HOME": str(home)}
    run_dir = tmp_path / "runs"
    settings = {
        **SHORT,
        "data.num_clients": 1,
        "federation.num_nodes": 1,
        # Task affinity needs at least two clients: one client is one group, without sketches.
        "strategies.clustering": "strategies.baselines:OneGroup",
        "boost.steps": 0,  # three exchanges fewer: the point here is the transport
        "run_dir": str(run_dir),
    }
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in settings.items())
    logs = tmp_path / "logs"
    logs.mkdir()

    def log(name: str) -> str:
        return (logs / f"{name}.log").read_text()

    with process_trees(logs) as start:
        # One port serves the Fleet, Control and Runtime (ServerAppIo) APIs over HTTPS in Flower 1.42.
        superlink = [str(BIN / "flower-superlink"), "--database", str(tmp_path / "state.db"), "--port", str(port)]
        tls = ["--ssl-ca-certfile", str(pki / "ca.pem"), "--ssl-certfile", str(pki / "server.pem")]
        tls += ["--ssl-keyfile", str(pki / "server.key")]
        start(
            "superlink", [*superlink, *tls, "--enable-supernode-auth", "--disable-runtime-dependency-installation"], env
        )
        wait_for_port(port)

        node_ids = {}
        for name, (_, public) in {"registered": registered, "registered-wrong-ca": registered_wrong_ca}.items():
            node_ids[name] = str(flwr_json("supernode", "register", str(public), "secure", env=env)["node-id"])

        def supernode(name: str, *args: str) -> subprocess.Popen:
            # --port: each SuperNode serves its own Runtime API (for its ClientApp processes).
            node = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}", "--port", str(free_port())]
            config = ["--node-config", "partition-id=0 num-partitions=1"]
            return start(f"supernode-{name}", [*node, *args, *config], env)

        trusted = ["--root-certificates", str(pki / "ca.pem")]
        good = supernode("registered", *trusted, "--auth-supernode-private-key", str(registered[0]))
        refused = {
            "unregistered": supernode("unregistered", *trusted, "--auth-supernode-private-key", str(unregistered[0])),
            "keyless": supernode("keyless", *trusted),  # would self-register, which auth disables
            "registered-wrong-ca": supernode(
                "registered-wrong-ca",
                "--root-certificates",
                str(pki / "other-ca.pem"),
                "--auth-supernode-private-key",
                str(registered_wrong_ca[0]),
            ),
        }
        wait_until(
            lambda: "SuperNode ID:" in log("supernode-registered"), 120, "the registered SuperNode never connected"
        )
        wait_until(lambda: all(p.poll() is not None for p in refused.values()), 120, "a refused SuperNode kept running")
        assert good.poll() is None, log("supernode-registered")
        reasons = {
            "unregistered": "[code: 2004] Failed to activate SuperNode.",  # its key is unknown
            "keyless": "All SuperNodes must be registered via the CLI.",  # self-registration is off
            "registered-wrong-ca": "[SSL: CERTIFICATE_VERIFY_FAILED]",  # it does not trust the SuperLink
        }
        for name, proc in refused.items():
            text = log(f"supernode-{name}")
            assert proc.returncode != 0 and "Exit Code: 305" in text, f"{name}: rc {proc.returncode}\n{text}"
            assert reasons[name] in text, text
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in log("superlink")
        assert '"POST /v1/fleet/register-node HTTP/1.1" 412' in log("superlink")

        # The SuperLink's view: the authenticated node online, the node behind the wrong CA registered but
        # never online, and the refused keys nowhere.
        listed = flwr_json("supernode", "list", "secure", env=env)["nodes"]
        status = {n["node-id"]: n["status"] for n in listed}
        assert status == {node_ids["registered"]: "online", node_ids["registered-wrong-ca"]: "registered"}, listed

        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "secure", "--stream", "--run-config", overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        (logs / "flwr-run.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, log("flwr-run")[-3000:]
        # `flwr run --stream` exits 0 even when the ServerApp fails: the report is the proof.
        wait_until(lambda: bool(list(run_dir.glob("*/report.json"))), 60, f"no report.json:\n{log('flwr-run')[-3000:]}")
    (report_file,) = run_dir.glob("*/report.json")
    report = json.loads(report_file.read_text())
    assert report["num_clients"] == 1 and report["num_groups"] == 1, report
    assert math.isfinite(report["average"]["ensemble"]["test_loss"]), report
    assert math.isfinite(report["clients"][0]["test_loss"]), report
