"""Party credentials: one long-term key and self-signed certificate per party.

Why: every link between two parties is mutually authenticated TLS 1.3
(:mod:`cipherdm_torch.mpc.channel`). A party proves its identity with its private key;
the others accept it only if its certificate is byte-for-byte the one configured for
its rank (pinning, no certificate authority that could mint new identities).

A credentials folder holds ``party{r}.crt`` for every rank and, on the host of party
``r``, ``party{r}.key`` (mode 0600) — across machines copy all ``.crt`` files to every
host and each ``.key`` only to its own. ``cipherdm keys --out DIR`` writes a full set;
local launches make throwaway ones in a private temporary folder.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import List

__all__ = ["Credentials", "create", "load", "fingerprint", "CERT", "KEY"]

CERT = "party{rank}.crt"
KEY = "party{rank}.key"


def fingerprint(cert_der: bytes) -> str:
    """SHA-256 of a DER certificate (hex): the identity a peer is pinned to."""
    return hashlib.sha256(cert_der).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """What one party needs: its own key / certificate files and every party's certificate."""

    rank: int
    key_file: str
    cert_file: str
    certs_pem: List[bytes]  # index = rank

    @property
    def world_size(self) -> int:
        return len(self.certs_pem)

    def peer_fingerprint(self, rank: int) -> str:
        import ssl

        return fingerprint(ssl.PEM_cert_to_DER_cert(self.certs_pem[rank].decode()))


def _new_party(rank: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cipherdm-party-{rank}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def create(folder: str, world_size: int = 3, overwrite: bool = False) -> List[str]:
    """Write a key and self-signed certificate for each of ``world_size`` parties into ``folder``."""
    if world_size < 2:
        raise ValueError(f"world_size must be at least 2, got {world_size}")
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o700)
    written = []
    for rank in range(world_size):
        key_path = os.path.join(folder, KEY.format(rank=rank))
        cert_path = os.path.join(folder, CERT.format(rank=rank))
        if not overwrite and (os.path.exists(key_path) or os.path.exists(cert_path)):
            raise FileExistsError(f"{key_path} or {cert_path} exists; refusing to overwrite "
                                  f"credentials (pass a new folder)")
        key_pem, cert_pem = _new_party(rank)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "wb") as f:
            f.write(cert_pem)
        written += [key_path, cert_path]
    return written


def load(folder: str, rank: int, world_size: int) -> Credentials:
    """Credentials of party ``rank`` from ``folder``, with a clear error for what is missing."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"credentials folder {folder!r} does not exist (create one with "
                                f"`cipherdm keys --out {folder}`)")
    certs = []
    for r in range(world_size):
        path = os.path.join(folder, CERT.format(rank=r))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: every host needs the certificate of "
                                    f"every party")
        with open(path, "rb") as f:
            certs.append(f.read())
    key_file = os.path.join(folder, KEY.format(rank=rank))
    if not os.path.exists(key_file):
        raise FileNotFoundError(f"{key_file} is missing: party {rank} needs its own private key")
    return Credentials(rank, key_file, os.path.join(folder, CERT.format(rank=rank)), certs)
