"""Key files of the platform adapters: checked when the config is loaded, read when the adapter starts,
and the RSA signatures made and checked with them.

Each check below is a schema `check=`. So a bad key file fails `appliance check-config` and
`appliance run` with exit 2, and the error names the dotted key, before any payment is taken:
  * missing, a directory, or unreadable: the schema's `SecretFile` checks;
  * readable by others: also a `SecretFile` check, for every secret. It must grant nothing to
    "others"; group read is allowed, so that root:appliance 0640 works;
  * wrong format.

Formats accepted:
  * RSA private keys: PEM, either PKCS#8 ("BEGIN PRIVATE KEY", what WeChat's apiclient_key.pem
    is) or PKCS#1 ("BEGIN RSA PRIVATE KEY"); or the bare base64 that Alipay's key tool prints.
  * Public keys: PEM "BEGIN PUBLIC KEY" (WeChat Pay's pub_key.pem), or bare base64 (the Alipay
    public key copied from its console).
  * Certificates: PEM X.509.
A file may end with a newline. Key text never appears in an error.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from appliance.schema import SecretFile

#: The smallest RSA key accepted, in bits (the platforms issue 2048-bit keys).
MIN_RSA_BITS = 2048


def private_key_file(f: SecretFile) -> SecretFile:
    """Schema check: a private RSA key file that parses (the schema checked its mode)."""
    load_private_key(f)
    return f


def public_key_file(p: Path) -> Path:
    """Schema check: an RSA public key file (not a secret, so any mode)."""
    load_public_key(p)
    return p


def certificate_file(p: Path) -> Path:
    """Schema check: a PEM X.509 certificate file."""
    data = _read(p)  # a missing or unreadable file says so, not "not a certificate"
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{p} is not a PEM X.509 certificate") from None
    return p


def secret_text(*, length: int | None = None, alphabet: str | None = None):
    """Schema check factory: a private file holding one line of text (an API key, an app secret),
    of exactly `length` characters when given, drawn from `alphabet` when given."""
    def check(f: SecretFile) -> SecretFile:
        text = f.read()
        if not text or "\n" in text:
            raise ValueError(f"secret file {f.path} must hold one line of text")
        if length is not None and len(text) != length:
            raise ValueError(f"secret file {f.path} must hold {length} characters, it holds {len(text)}")
        if alphabet is not None and not set(text) <= set(alphabet):
            raise ValueError(f"secret file {f.path} holds characters other than {_describe(alphabet)}")
        return f
    return check


def _describe(alphabet: str) -> str:
    return "letters and digits" if alphabet == ALNUM else repr(alphabet)


ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def load_private_key(f: SecretFile) -> rsa.RSAPrivateKey:
    data = _read(f.path)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(_bare_base64(data), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{f.path} is not an unencrypted RSA private key (PEM, or the bare base64 of "
                         "PKCS#8)") from None
    return _rsa(key, f.path)


def load_public_key(p: Path) -> rsa.RSAPublicKey:
    data = _read(p)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(_bare_base64(data))
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{p} is not an RSA public key (PEM 'BEGIN PUBLIC KEY', or its bare base64)") from None
    return _rsa(key, p)


def _rsa(key, path: Path):
    if not isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        raise ValueError(f"{path} holds a {type(key).__name__.lstrip('_')}, not an RSA key")
    if key.key_size < MIN_RSA_BITS:
        raise ValueError(f"{path} holds a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are needed")
    return key


def _read(p: Path) -> bytes:
    try:
        return Path(p).read_bytes()
    except OSError as e:
        raise ValueError(f"{p}: {e.strerror}") from None


def _bare_base64(data: bytes) -> bytes:
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


def rsa_sign(key: rsa.RSAPrivateKey, message: bytes) -> str:
    """SHA256withRSA (PKCS#1 v1.5), base64: WeChat Pay APIv3's and Alipay's RSA2 signature."""
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def rsa_verify(key: rsa.RSAPublicKey, message: bytes, signature_b64: str) -> bool:
    """True only if `signature_b64` is a valid SHA256withRSA signature of `message` by `key`."""
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False
    return True


def generate_rsa(private_path: Path, public_path: Path) -> None:
    """Write a new 2048-bit RSA key pair: the private key PKCS#8 PEM (mode 0600), the public PEM.
    For the simulators, the demo and the tests; merchants download theirs from the platform."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    Path(public_path).write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
