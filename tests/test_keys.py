"""Key files: the formats merchants download, refused clearly when wrong, and SHA256withRSA both ways."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from appliance.payments import keys
from appliance.schema import SecretFile


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    keys.generate_rsa(d / "private.pem", d / "public.pem")
    return d / "private.pem", d / "public.pem"


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _forms(private_pem: bytes, public_pem: bytes) -> dict[str, tuple[bytes, bytes]]:
    """The same key pair in every accepted form: (private, public)."""
    key = serialization.load_pem_private_key(private_pem, None)
    pkcs1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
    der8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub_der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "pem": (private_pem, public_pem),
        "pkcs1-pem": (pkcs1, public_pem),
        "bare-base64 (Alipay's key tool and console)": (base64.b64encode(der8) + b"\n",
                                                         base64.b64encode(pub_der) + b"\n"),
        "base64 wrapped over lines": (base64.encodebytes(der8), base64.encodebytes(pub_der)),
    }


def test_every_accepted_form_signs_and_verifies(tmp_path, pair):
    for name, (private, public) in _forms(pair[0].read_bytes(), pair[1].read_bytes()).items():
        priv = keys.load_private_key(SecretFile(_write(tmp_path / "k", private)))
        pub = keys.load_public_key(_write(tmp_path / "p", public, 0o644))
        signature = keys.rsa_sign(priv, b"POST\n/v3/pay\n1700000000\nnonce\n{}\n")
        assert keys.rsa_verify(pub, b"POST\n/v3/pay\n1700000000\nnonce\n{}\n", signature), name
        assert not keys.rsa_verify(pub, b"POST\n/v3/pay\n1700000001\nnonce\n{}\n", signature), name


@pytest.mark.parametrize("signature", ["", "not base64!", base64.b64encode(b"x" * 256).decode(), "QUJD"])
def test_a_bad_signature_is_false_not_an_exception(pair, signature):
    pub = keys.load_public_key(pair[1])
    assert keys.rsa_verify(pub, b"message", signature) is False


def _ec_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _small_rsa_pem() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@pytest.mark.parametrize("content,says", [
    (b"", "not an unencrypted RSA private key"),
    (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not an unencrypted RSA private key"),
    (b"hello world", "not an unencrypted RSA private key"),
    (b"MIIB" * 10, "not an unencrypted RSA private key"),
    (_ec_pem(), "not an RSA key"),
    (_small_rsa_pem(), "1024-bit RSA key; at least 2048"),
], ids=["empty", "damaged-pem", "text", "bad-der", "ec-key", "short-rsa"])
def test_a_private_key_in_the_wrong_format_is_refused_by_name(tmp_path, content, says):
    f = SecretFile(_write(tmp_path / "apiclient_key.pem", content), "providers.wx.merchant_key_file")
    with pytest.raises(ValueError) as e:
        keys.private_key_file(f)
    assert says in str(e.value) and str(f.path) in str(e.value)


def test_a_public_key_file_that_holds_a_private_key_or_a_certificate_is_refused(tmp_path, pair):
    with pytest.raises(ValueError, match="not an RSA public key"):
        keys.public_key_file(pair[0])
    with pytest.raises(ValueError, match="not an RSA public key"):
        keys.public_key_file(_write(tmp_path / "junk", b"-----BEGIN CERTIFICATE-----\nAA\n-----END CERTIFICATE-----\n"))
    with pytest.raises(ValueError, match="No such file"):
        keys.public_key_file(tmp_path / "absent.pem")
    with pytest.raises(ValueError, match="not a PEM X.509 certificate"):
        keys.certificate_file(pair[1])


@pytest.mark.parametrize("text,length,ok", [
    ("0123456789abcdef0123456789ABCDEF\n", 32, True),  # a trailing newline is fine
    ("0123456789abcdef0123456789ABCDEF", 32, True),
    ("0123456789abcdef", 32, False),
    ("0123456789abcdef0123456789ABCDE!", 32, False),
    ("line one\nline two\n", None, False),
    ("\n", None, False),
])
def test_secret_text(tmp_path, text, length, ok):
    f = SecretFile(_write(tmp_path / "api_key", text.encode()), "providers.wx.api_key_file")
    check = keys.secret_text(length=length, alphabet=keys.ALNUM if length else None)
    if ok:
        assert check(f) is f
        return
    with pytest.raises(ValueError) as e:
        check(f)
    assert "0123456789abcdef" not in str(e.value)  # the secret is never in the message


def test_a_generated_private_key_is_private(tmp_path):
    keys.generate_rsa(tmp_path / "k.pem", tmp_path / "p.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
