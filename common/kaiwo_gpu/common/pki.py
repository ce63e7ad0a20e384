"""A development CA and the certificates kaiwo-gpu's processes use (`kaiwo-gpu certs`,
`kaiwo-gpu up --tls`, the tests): one function makes a CA, one issues a certificate for an
identity, one writes a pair to disk with the key readable by its owner alone.

For development and small clusters, not a replacement for an organisation's PKI: any CA
works when its certificates carry the URI SAN `identity` describes.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kaiwo_gpu.common.identity import Identity, Role

CA_NAME = "ca"
DEFAULT_CA_DAYS = 3650
DEFAULT_DAYS = 365
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
"""What a coordinator's certificate names unless told otherwise: it serves on loopback."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    certificate_pem: bytes
    key_pem: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_ca(common_name: str = "kaiwo-gpu development CA", days: int = DEFAULT_CA_DAYS) -> KeyPair:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _alternative_name(text: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        return x509.DNSName(text)


def issue(
    ca: KeyPair,
    holder: Identity,
    *,
    sans: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    not_before: datetime.datetime | None = None,
) -> KeyPair:
    """A certificate for `holder` signed by `ca`, valid from `not_before` (default: now)
    for `days`. Its URI SAN names the identity; `sans` adds DNS names and IP addresses (a
    coordinator's, which clients check; by default the loopback names). A coordinator's
    certificate serves and may also call (it is what `up` gives the local admin tools); the
    others are for clients only."""
    ca_certificate = x509.load_pem_x509_certificate(ca.certificate_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _key()
    start = not_before or _now() - datetime.timedelta(minutes=5)
    serves = holder.role is Role.COORDINATOR
    names = sans or (LOCAL_NAMES if serves else ())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] * serves)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, holder.name)]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(holder.uri), *map(_alternative_name, names)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(certificate.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_file(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Writes `path` whole, as a new file created with `mode` and renamed into place: a
    symlink planted at `path` is replaced, never followed, and no reader sees half a file
    or a key with wider permissions. Without `replace` an existing file is refused."""
    if not replace and (path.exists() or path.is_symlink()):
        raise FileExistsError(errno.EEXIST, "exists", str(path))
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    descriptor = os.open(temporary, flags, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # whatever the umask
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_pair(
    directory: Path, name: str, pair: KeyPair, *, replace: bool = True
) -> tuple[Path, Path]:
    """Writes `name.crt` and `name.key` (mode 0600 from its creation, never readable by
    others even for a moment); returns their paths. Without `replace`, a name that has
    either file already is refused (FileExistsError), so issuing never clobbers the CA
    or a running process's certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    certificate = directory / f"{name}.crt"
    key = directory / f"{name}.key"
    if not replace:
        for path in (certificate, key):
            if path.exists() or path.is_symlink():
                raise FileExistsError(errno.EEXIST, "exists", str(path))
    write_file(key, pair.key_pem, 0o600)
    write_file(certificate, pair.certificate_pem, 0o644)
    return certificate, key


def read_pair(directory: Path, name: str) -> KeyPair:
    return KeyPair(
        (directory / f"{name}.crt").read_bytes(), (directory / f"{name}.key").read_bytes()
    )


def pair_problem(certificate_pem: bytes, key_pem: bytes) -> str | None:
    """Why a certificate file and a key file cannot serve together (not PEM, or the key is
    not the certificate's), None when they can: a rotation caught between writing the two
    files must not be loaded."""
    try:
        chain = x509.load_pem_x509_certificates(certificate_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        return f"not a PEM certificate and unencrypted PEM key ({error})"
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        return "the key is not the certificate's"
    return None


def ca_problem(ca_pem: bytes) -> str | None:
    """Why a CA file cannot check client certificates (not PEM, or no CA certificate in
    it), None when it can: gRPC would take an empty file and refuse every client."""
    try:
        certificates = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as error:
        return f"not PEM certificates ({error})"
    for certificate in certificates:
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        except x509.ExtensionNotFound:
            continue
        if constraints.value.ca:
            return None
    return "no CA certificate in it (none has basicConstraints CA:TRUE)"


def load_or_make_ca(directory: Path) -> KeyPair:
    """The CA in `directory` (`ca.crt`, `ca.key`), made there when it has none."""
    if (directory / f"{CA_NAME}.crt").exists() and (directory / f"{CA_NAME}.key").exists():
        return read_pair(directory, CA_NAME)
    ca = new_ca()
    write_pair(directory, CA_NAME, ca)
    return ca


def issue_into(
    directory: Path,
    ca: KeyPair,
    holder: Identity,
    *,
    sans: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
    replace: bool = True,
) -> tuple[Path, Path]:
    """Issues a certificate for `holder` and writes it as `NAME.crt` and `NAME.key`; the
    CA's own name is never a holder's file."""
    if holder.name == CA_NAME:
        raise FileExistsError(errno.EEXIST, "the CA's file name", str(directory / CA_NAME))
    return write_pair(
        directory, holder.name, issue(ca, holder, sans=sans, days=days), replace=replace
    )
