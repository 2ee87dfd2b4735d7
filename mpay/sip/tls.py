"""TLS for SIP (``sips:``, RFC 3261 26.2): the servers' certificate, and how devices check it.

The servers present one certificate and key (PEM files from the ``[tls]``
section).  For development a self-signed certificate is made on first start
when ``tls.self_signed`` is on and the files are missing, the way the
servers' signing keys are; a device then pins that certificate (it is its
own trust root).  In production the files come from a CA, and devices
verify against the CA file.  TLS 1.2 is the floor; 1.3 is negotiated
whenever both ends have it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.logger import Logger

SELF_SIGNED_LIFETIME_DAYS = 825
"""Lifetime of a development certificate (the longest that clients commonly accept)."""

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

log = Logger()


class TLSConfigError(Exception):
    """The certificate, key or version setting cannot be used; the message says which."""


def make_self_signed(cert_path: str, key_path: str, names: list[str]) -> None:
    """A P-256 key and a self-signed certificate for *names* (DNS names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives: list[x509.GeneralName] = []
    for name in names:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alternatives.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_LIFETIME_DAYS))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256()))
    for path in (cert_path, key_path):
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    with open(cert_path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))


def server_options(tls_cfg: dict) -> ssl.CertificateOptions:
    """The servers' TLS context from the ``[tls]`` section (making a development pair if asked)."""
    cert_path, key_path = tls_cfg["certificate"], tls_cfg["private_key"]
    if tls_cfg["self_signed"] and not (os.path.exists(cert_path) and os.path.exists(key_path)):
        make_self_signed(cert_path, key_path, tls_cfg["names"])
        log.warn("tls: made a self-signed development certificate {cert} for {names}; devices"
                 " must pin it", cert=cert_path, names=", ".join(tls_cfg["names"]))
    try:
        with open(cert_path, "rb") as cert, open(key_path, "rb") as key:
            pair = ssl.PrivateCertificate.loadPEM(cert.read() + b"\n" + key.read())
    except (OSError, ValueError, ssl.SSL.Error) as exc:
        raise TLSConfigError(f"cannot load the TLS certificate {cert_path} and key {key_path}:"
                             f" {exc}") from exc
    return ssl.CertificateOptions(privateKey=pair.privateKey.original,
                                  certificate=pair.original,
                                  raiseMinimumTo=TLS_VERSIONS[tls_cfg["min_version"]])


def client_options(hostname: str, trust_path: str, min_version: str = "1.2"):
    """How a device checks the server: *trust_path* holds the pinned certificate or the CA."""
    try:
        with open(trust_path, "rb") as handle:
            trust = ssl.Certificate.loadPEM(handle.read())
    except (OSError, ValueError, ssl.SSL.Error) as exc:
        raise TLSConfigError(f"cannot load the trusted certificate {trust_path}: {exc}") from exc
    return ssl.optionsForClientTLS(hostname, trustRoot=trust,
                                   extraCertificateOptions={
                                       "raiseMinimumTo": TLS_VERSIONS[min_version]})


def main(argv: list[str] | None = None) -> int:
    """``python -m mpay.sip.tls CERT KEY NAME...``: a development certificate by hand."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3:
        print("usage: python -m mpay.sip.tls CERT.pem KEY.pem NAME [NAME...]", file=sys.stderr)
        return 2
    make_self_signed(args[0], args[1], args[2:])
    print(f"self-signed certificate for {', '.join(args[2:])}: {args[0]} (key {args[1]}, 0600)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
