"""A Dask scheduler address is code execution for whoever answers there (Dask unpickles its peer's control
frames), so a flow run may only name schedulers the settings list where flows run: an unlisted one is refused
before any connection is made. A listed scheduler across machines is reached over TLS, with the certificates
the settings name."""

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import free_port, stop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prefect.exceptions import ParameterTypeError
from test_sweep import TINY, home, texts  # noqa: F401 (fixtures)

from flows.params import checked
from flows.sweep import sweep
from settings import isolated_env

ROOT = Path(__file__).resolve().parent.parent


class Listener:
    """A plain TCP listener on loopback that counts the connections made to it."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port, self.accepted = self.sock.getsockname()[1], 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_an_unlisted_scheduler_is_refused_before_any_connection(prefect_api, texts, monkeypatch):  # noqa: F811
    listener = Listener()
    address = f"tcp://127.0.0.1:{listener.port}"
    try:
        monkeypatch.setenv("CHAR_RNN_DASK_SCHEDULERS", "tls://10.0.0.5:8786")  # another one is listed
        with pytest.raises(ValueError, match="not a scheduler named in CHAR_RNN_DASK_SCHEDULERS"):
            checked(sweep, {"data_dir": texts, "dask_address": address})
        with pytest.raises(ParameterTypeError, match="CHAR_RNN_DASK_SCHEDULERS"):
            sweep(data_dir=texts, space=TINY, trials=1, steps=20, dask_address=address)
        monkeypatch.setenv("CHAR_RNN_DASK_SCHEDULERS", address)  # listed: now it may be reached
        checked(sweep, {"data_dir": texts, "dask_address": f"127.0.0.1:{listener.port}"})  # tcp:// implied
    finally:
        listener.close()
    assert listener.accepted == 0


def certificate(name: str, folder: Path, ca: tuple | None = None) -> tuple:
    """A key and a certificate for 127.0.0.1 (`name`.key, `name`.pem), signed by `ca` (else self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_key, issuer = (key, subject) if ca is None else ca
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(issuer_key, hashes.SHA256())
    )
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, subject


@pytest.fixture
def tls_cluster(tmp_path):
    """`dask scheduler` and one `dask worker` on tls://127.0.0.1, certificates from a CA made here."""
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = certificate("ca", certs)
    for name in ("scheduler", "worker", "client"):
        certificate(name, certs, ca)
    port, log = free_port(), tmp_path / "dask.log"
    address = f"tls://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CHAR_RNN_"))}
    env |= isolated_env(tmp_path / "workers-home") | {"OPENBLAS_NUM_THREADS": "1"}
    env["DASK_TEMPORARY_DIRECTORY"] = str(tmp_path / "dask")
    dask = str(Path(sys.executable).parent / "dask")

    def tls(who: str) -> list[str]:
        return ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / f"{who}.pem")] + [
            "--tls-key",
            str(certs / f"{who}.key"),
        ]

    scheduler = [dask, "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", str(port)]
    worker = [dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard"]
    worker += ["--local-directory", str(tmp_path / "dask")]
    procs = []
    try:
        with open(log, "w") as out:
            for cmd in (scheduler + ["--no-dashboard", *tls("scheduler")], worker + tls("worker")):
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        yield address, certs, log
    finally:
        for p in reversed(procs):
            stop(p)


def test_a_listed_scheduler_is_reached_over_tls(prefect_api, texts, home, tls_cluster, monkeypatch):  # noqa: F811
    from distributed import Client
    from distributed.security import Security

    address, certs, log = tls_cluster
    security = Security(
        tls_ca_file=str(certs / "ca.pem"),
        tls_client_cert=str(certs / "client.pem"),
        tls_client_key=str(certs / "client.key"),
        require_encryption=True,
    )
    with Client(address, security=security, timeout=120, set_as_default=False) as c:
        try:
            c.wait_for_workers(1, timeout=120)  # the worker joined over TLS
        except TimeoutError:
            pytest.fail(f"the TLS worker did not join {address}:\n{log.read_text()[-5000:]}")
    monkeypatch.setenv("CHAR_RNN_DASK_SCHEDULERS", address)
    missing = "set CHAR_RNN_DASK_TLS_CA, CHAR_RNN_DASK_TLS_CERT, CHAR_RNN_DASK_TLS_KEY"
    with pytest.raises(ValueError, match=missing):
        sweep(data_dir=texts, space=TINY, trials=1, steps=20, checkpoint_every=10, dask_address=address)
    for what, name in (("CA", "ca.pem"), ("CERT", "client.pem"), ("KEY", "client.key")):
        monkeypatch.setenv(f"CHAR_RNN_DASK_TLS_{what}", str(certs / name))

    o = sweep(data_dir=texts, space=TINY, trials=1, steps=20, checkpoint_every=10, dask_address=address)

    (trial,) = o.trials
    assert trial.status == "winner" and trial.rungs[0].worker.startswith("tls://127.0.0.1:"), trial
