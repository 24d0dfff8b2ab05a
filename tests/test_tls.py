"""TLS and mutual TLS on the gRPC servers, with certificates made by the test (`cryptography`), through real
secure channels: the health server of reward and trainer, and the inference server (ChatService, ModelAdmin).
ModelAdmin over plaintext from another machine is refused; that part uses a fake context, since every real
peer here is on loopback.
"""

import datetime
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhf_online.config import ServiceConfig
from rlhf_online.health import HealthServer
from rlhf_online.inference.admin import ModelAdmin
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.server import create_server
from rlhf_online.proto.rlhf.v1 import admin_pb2, admin_pb2_grpc, chat_pb2_grpc
from rlhf_online.tls import (
    TlsConfigError,
    add_port,
    channel_credentials,
    is_local_peer,
    is_tls,
    server_credentials,
)
from rlhf_online.trainer.config import TrainerConfig
from rlhf_online.trainer.service import create_service as create_trainer
from tests.test_inference_server import ask, config_for

K8S_PROBE = Path(__file__).resolve().parent.parent / "k8s" / "components" / "tls" / "grpc_health_probe.py"

# ---- certificates ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    pem = Pem(folder / f"{stem}.crt", folder / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pem


def make_ca(folder: Path, stem: str) -> tuple[Pem, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(_name(stem))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(folder, stem, cert, key), cert, key


def make_leaf(folder: Path, stem: str, ca, *, server: bool) -> Pem:
    """A certificate signed by `ca` = (pem, cert, key): for 127.0.0.1/localhost if `server`, else a client."""
    _, ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _write(folder, stem, builder.sign(ca_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: Pem  # signs the server and the good client
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = make_ca(folder, "test-ca"), make_ca(folder, "rogue-ca")
    return Pki(
        ca=ca[0],
        server=make_leaf(folder, "server", ca, server=True),
        client=make_leaf(folder, "client", ca, server=False),
        rogue_client=make_leaf(folder, "rogue-client", rogue_ca, server=False),
    )


def tls_settings(pki: Pki, *, mutual: bool) -> ServiceConfig:
    return ServiceConfig(
        tls_cert_file=str(pki.server.cert),
        tls_key_file=str(pki.server.key),
        tls_client_ca_file=str(pki.ca.cert) if mutual else "",
    )


def client(pki: Pki, who: Pem | None = None) -> grpc.ChannelCredentials:
    if who is None:
        return channel_credentials(str(pki.ca.cert))
    return channel_credentials(str(pki.ca.cert), str(who.cert), str(who.key))


def health_status(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of a Health/Check call (OK if it answered SERVING)."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


# ---- health servers (reward, trainer) ----------------------------------------------------------------------


@pytest.fixture
def health_server(request, pki):
    server = HealthServer(
        0, host="127.0.0.1", credentials=server_credentials(tls_settings(pki, mutual=request.param))
    )
    server.set_serving(True)
    yield f"127.0.0.1:{server.port}"
    server.stop(grace_s=0.5)


@pytest.mark.parametrize("health_server", [False], indirect=True)
def test_health_server_speaks_tls_and_refuses_plaintext(health_server, pki):
    assert health_status(health_server, client(pki)) == grpc.StatusCode.OK
    assert health_status(health_server, None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("health_server", [True], indirect=True)
def test_health_server_under_mutual_tls_refuses_clients_without_a_cert_from_its_ca(health_server, pki):
    assert health_status(health_server, client(pki, pki.client)) == grpc.StatusCode.OK
    assert health_status(health_server, client(pki)) == grpc.StatusCode.UNAVAILABLE  # no client cert
    assert health_status(health_server, client(pki, pki.rogue_client)) == grpc.StatusCode.UNAVAILABLE
    assert health_status(health_server, None) == grpc.StatusCode.UNAVAILABLE


def test_the_trainer_serves_health_over_mutual_tls_from_its_config(pki, tmp_path):
    """The trainer's own health port (the reward service builds its HealthServer the same way)."""
    settings = tls_settings(pki, mutual=True)
    config = TrainerConfig(
        kafka_bootstrap="", registry_dir=str(tmp_path / "registry"), grpc_host="127.0.0.1", grpc_port=0,
        metrics_port=-1, tls_cert_file=settings.tls_cert_file, tls_key_file=settings.tls_key_file,
        tls_client_ca_file=settings.tls_client_ca_file,
    )  # fmt: skip
    trainer = create_trainer(config)
    trainer.start()
    try:
        target = f"127.0.0.1:{trainer.grpc_port}"
        assert health_status(target, client(pki, pki.client)) == grpc.StatusCode.OK
        assert health_status(target, client(pki)) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        assert health_status(target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    finally:
        trainer.stop()


def test_the_trainer_refuses_to_start_with_bad_tls_settings_before_touching_the_registry(tmp_path):
    registry = tmp_path / "registry"
    config = TrainerConfig(
        kafka_bootstrap="", registry_dir=str(registry), base_model_dir=str(tmp_path / "base"),
        grpc_port=0, metrics_port=-1, tls_key_file=str(tmp_path / "server.key"),
    )  # fmt: skip
    with pytest.raises(TlsConfigError, match="tls_cert_file is not set"):
        create_trainer(config).start()
    assert not registry.exists() or not any(registry.iterdir())


def run_k8s_probe(port: int, ca: Pem, pod: Pem, *, mutual: bool) -> subprocess.CompletedProcess:
    """The exec probe of k8s/components/tls, as the kubelet runs it in a pod whose certificate is `pod`."""
    env = {
        **os.environ, "RLHF_GRPC_PORT": str(port), "RLHF_TLS_CERT_FILE": str(pod.cert),
        "RLHF_TLS_KEY_FILE": str(pod.key), "RLHF_TLS_CLIENT_CA_FILE": str(ca.cert) if mutual else "",
    }  # fmt: skip
    command = [sys.executable, str(K8S_PROBE), "localhost", str(ca.cert)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("mutual", [False, True])
def test_the_kubernetes_tls_probe_passes_only_while_serving(pki, mutual):
    server = HealthServer(
        0, host="127.0.0.1", credentials=server_credentials(tls_settings(pki, mutual=mutual))
    )
    # Under mutual TLS the probe presents the pod's certificate: here the client one (a pod's has both).
    pod = pki.client if mutual else pki.server
    try:
        server.set_serving(True)
        done = run_k8s_probe(server.port, pki.ca, pod, mutual=mutual)
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stderr
        server.set_serving(False)
        done = run_k8s_probe(server.port, pki.ca, pod, mutual=mutual)
        assert done.returncode == 1 and "NOT_SERVING" in done.stdout, done.stderr
    finally:
        server.stop(grace_s=0.5)
    done = run_k8s_probe(server.port, pki.ca, pod, mutual=mutual)  # nothing listens: fails, with a reason
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


class RecordingHealth(health_pb2_grpc.HealthServicer):
    """Answers SERVING and records whether each call came over TLS, as ModelAdmin will see it."""

    def __init__(self) -> None:
        self.over_tls: list[bool] = []

    async def Check(self, request, context):
        self.over_tls.append(is_tls(context))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("tls", [True, False])
async def test_a_servicer_sees_whether_its_call_came_over_tls(pki, tls):
    servicer, server = RecordingHealth(), grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = server_credentials(tls_settings(pki, mutual=False)) if tls else None
    port = add_port(server, "127.0.0.1", 0, credentials)
    await server.start()
    target = f"127.0.0.1:{port}"
    channel = grpc.aio.secure_channel(target, client(pki)) if tls else grpc.aio.insecure_channel(target)
    async with channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    await server.stop(0)
    assert servicer.over_tls == [tls]


# ---- settings ---------------------------------------------------------------------------------------------


def test_tls_is_off_without_files():
    assert server_credentials(ServiceConfig()) is None


@pytest.mark.parametrize(
    "fields, fragment",
    [
        (dict(tls_cert_file="server.crt"), "tls_key_file is not set"),
        (dict(tls_key_file="server.key"), "tls_cert_file is not set"),
        (dict(tls_client_ca_file="ca.crt"), "TLS is off"),
        (dict(tls_cert_file="server.crt", tls_key_file="client.key"), "check that the key belongs"),
        (dict(tls_cert_file="missing.crt", tls_key_file="server.key"), "cannot read"),
        (dict(tls_cert_file="server.crt", tls_key_file="server.key", tls_client_ca_file="junk"), "not a"),
    ],
)
def test_bad_tls_settings_stop_the_service_with_a_clear_message(pki, fields, fragment):
    folder = pki.ca.cert.parent
    (folder / "junk").write_text("not a certificate\n")
    values = {k: str(folder / v) for k, v in fields.items()}
    with pytest.raises(TlsConfigError) as info:
        server_credentials(ServiceConfig(**values))
    assert fragment in str(info.value)


async def test_inference_refuses_to_start_with_bad_tls_settings_before_loading_anything(tmp_path):
    config = InferenceConfig(kafka_bootstrap="127.0.0.1:1", registry_dir=str(tmp_path), tls_cert_file="a.crt")
    with pytest.raises(TlsConfigError, match="tls_key_file is not set"):
        await create_server(config)


# ---- the inference server ---------------------------------------------------------------------------------


@pytest.mark.kafka
async def test_inference_serves_chat_and_admin_over_mutual_tls_only(
    kafka_bootstrap, topics, tiny_model_dir, tmp_path, pki
):
    settings = tls_settings(pki, mutual=True)
    config = config_for(
        kafka_bootstrap,
        topics,
        tiny_model_dir,
        tmp_path,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
        tls_client_ca_file=settings.tls_client_ca_file,
    )
    running = await create_server(config)
    target = f"127.0.0.1:{running.port}"
    try:
        async with grpc.aio.secure_channel(target, client(pki, pki.client)) as channel:
            answer = await chat_pb2_grpc.ChatServiceStub(channel).Chat(
                ask("hi", max_new_tokens=2), timeout=30
            )
            assert answer.model_version == "v000001"
            admin = admin_pb2_grpc.ModelAdminStub(channel)
            metadata = [("authorization", "Bearer admin-secret")]
            info = await admin.GetModel(admin_pb2.GetModelRequest(), timeout=30, metadata=metadata)
            assert info.version == "v000001" and info.serving
        for credentials in (client(pki), client(pki, pki.rogue_client)):
            async with grpc.aio.secure_channel(target, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await chat_pb2_grpc.ChatServiceStub(channel).Chat(ask("hi"), timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop(grace_s=1)


# ---- ModelAdmin needs TLS or a local peer -----------------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    """The parts of a grpc.aio.ServicerContext that ModelAdmin's authorization reads."""

    def __init__(self, peer: str, security: bytes, token: str = "admin-secret") -> None:
        self._peer, self._security, self._token = peer, security, token
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"transport_security_type": [self._security]}

    def invocation_metadata(self):
        return (("authorization", f"Bearer {self._token}"),)

    async def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(details)


class FakeRegistry:
    def manifest(self, kind, version):
        from rlhf_online.registry import Manifest

        return Manifest(kind=kind, version=version, parent_version=None, created_at_ms=1, files={})


def admin(require_protected: bool = True) -> ModelAdmin:
    return ModelAdmin(
        "admin-secret",
        FakeRegistry(),
        SimpleNamespace(engine=SimpleNamespace(version="v000001")),  # a follower serving v000001
        None,
        "t",
        require_protected=require_protected,
    )


async def test_model_admin_refuses_a_remote_plaintext_peer_before_reading_its_token():
    context = FakeContext("ipv4:10.1.2.3:50000", b"insecure")
    with pytest.raises(Aborted):
        await admin().GetModel(admin_pb2.GetModelRequest(), context)
    assert context.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs a TLS connection" in context.details and "RLHF_ALLOW_INSECURE_ADMIN" in context.details


@pytest.mark.parametrize(
    "peer, security, require",
    [
        ("ipv4:10.1.2.3:50000", b"ssl", True),  # TLS from anywhere
        ("ipv4:127.0.0.1:50000", b"insecure", True),  # loopback: kubectl port-forward, a sidecar
        ("ipv6:[::1]:50000", b"insecure", True),
        ("ipv4:10.1.2.3:50000", b"insecure", False),  # RLHF_ALLOW_INSECURE_ADMIN=true
    ],
)
async def test_model_admin_serves_tls_local_or_explicitly_insecure_peers(peer, security, require):
    info = await admin(require).GetModel(admin_pb2.GetModelRequest(), FakeContext(peer, security))
    assert info.version == "v000001"


@pytest.mark.parametrize(
    "peer, local",
    [
        ("ipv4:127.0.0.1:1", True),
        ("ipv4:127.8.9.10:1", True),
        ("ipv6:[::1]:1", True),
        ("ipv6:[::ffff:127.0.0.1]:1", True),
        ("unix:/tmp/s.sock", True),
        ("ipv4:10.0.0.1:1", False),
        ("ipv6:[2001:db8::1]:1", False),
        ("ipv4:garbage", False),
        ("", False),
    ],
)
def test_local_peers(peer, local):
    assert is_local_peer(peer) is local
