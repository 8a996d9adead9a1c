"""A throwaway certificate authority for the Kafka TLS tests, made with the `openssl`
command line (every machine the tests run on has it; no Python package needed)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# EC keys: an RSA key takes the openssl command a noticeable part of a second to make.
NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate, PEM
    server_cert: Path  # for 127.0.0.1 and localhost, signed by the CA
    server_key: Path  # PKCS#8, unencrypted (what Kafka's PEM key store reads)
    client_cert: Path  # for mutual TLS, signed by the CA
    client_key: Path
    other_ca: Path  # a CA that signed none of them


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", *NEW_KEY, "-keyout", key, "-out", cert, "-days", "2",
             "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    return cert, key


def _signed(directory: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n")
    _openssl("req", *NEW_KEY, "-keyout", key, "-out", csr, "-subj", f"/CN={name}", cwd=directory)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext, cwd=directory)  # fmt: skip
    return cert, key


def make_pki(directory: Path) -> Pki | None:
    """The CA and certificates, in `directory`; None without the openssl command."""
    if shutil.which("openssl") is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    server = _signed(directory, "broker", ca, "IP:127.0.0.1,DNS:localhost")
    client = _signed(directory, "client", ca, "DNS:client")
    other_ca, _ = _ca(directory, "other-ca")
    return Pki(ca[0], *server, *client, other_ca)
