"""TLS, and mutual TLS as an option, for every gRPC server, from PEM files named in the service config.

    credentials = server_credentials(config)       # None: plaintext (no tls_cert_file / tls_key_file)
    port = add_port(server, config.grpc_host, config.grpc_port, credentials)

`tls_cert_file` + `tls_key_file` turn TLS on; `tls_client_ca_file` also requires every client to present a
certificate signed by that CA (mutual TLS), so a client without one fails the handshake. The files are checked
at start-up with the standard library's `ssl`, so a wrong path, a key that does not match its certificate or a
file that is not PEM stops the service with a message naming the setting, instead of failing every handshake
later. Certificates are read once: a rotated certificate takes effect at the next (rolling) restart.
"""

import ipaddress
import ssl
from pathlib import Path
from typing import Protocol

import grpc


class TlsSettings(Protocol):
    """The TLS fields of `rlhf_online.config.ServiceConfig`."""

    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str


class TlsConfigError(ValueError):
    """The TLS settings are inconsistent or name files that are missing or invalid."""


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials | None:
    """Server credentials for `settings`, or None when TLS is off; raises TlsConfigError saying what to do."""
    cert, key, client_ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if not cert and not key:
        if client_ca:
            raise TlsConfigError(
                "tls_client_ca_file is set but TLS is off; mutual TLS needs tls_cert_file and tls_key_file"
            )
        return None
    if not (cert and key):
        missing = "tls_key_file" if cert else "tls_cert_file"
        raise TlsConfigError(f"TLS needs both tls_cert_file and tls_key_file; {missing} is not set")
    _check_pair(cert, key)
    if client_ca:
        _check_ca(client_ca)
    return grpc.ssl_server_credentials(
        [(_read("tls_key_file", key), _read("tls_cert_file", cert))],
        root_certificates=_read("tls_client_ca_file", client_ca) if client_ca else None,
        require_client_auth=bool(client_ca),
    )


def add_port(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `host:port` (0: a free port) with TLS when `credentials` is given; returns the bound port."""
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise OSError(f"cannot bind gRPC port {address}: {e}; is it taken? (--grpc-port)") from e
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {address}; is it taken? (--grpc-port)")
    return bound


def channel_credentials(ca_file: str, cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """Client credentials that trust `ca_file`, presenting `cert_file` + `key_file` (mutual TLS) if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read("ca_file", ca_file),
        private_key=_read("key_file", key_file) if key_file else None,
        certificate_chain=_read("cert_file", cert_file) if cert_file else None,
    )


def is_protected(context: grpc.aio.ServicerContext) -> bool:
    """True if the call came over TLS, or from this machine (loopback or a unix socket), so a secret in its
    metadata crossed no network in clear text. A TLS-terminating sidecar on loopback counts as local."""
    return is_tls(context) or is_local_peer(context.peer())


def is_tls(context: grpc.aio.ServicerContext) -> bool:
    """True if the call came over a TLS connection."""
    return b"ssl" in context.auth_context().get("transport_security_type", [])


def is_local_peer(peer: str) -> bool:
    """`ipv4:127.0.0.1:5123`, `ipv6:[::1]:5123`, `unix:/path` -> True; a remote address -> False."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _check_pair(cert: str, key: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except OSError as e:
        if isinstance(e, ssl.SSLError):
            raise TlsConfigError(
                f"tls_cert_file {cert} and tls_key_file {key} are not a PEM certificate and its private key "
                f"({e.reason or e}); check that the key belongs to the certificate"
            ) from e
        raise TlsConfigError(f"cannot read the TLS certificate or key: {e}") from e


def _check_ca(client_ca: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=client_ca)
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f"tls_client_ca_file {client_ca} is not a readable PEM CA bundle: {e}") from e


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsConfigError(f"cannot read {setting} {path}: {e}") from e
