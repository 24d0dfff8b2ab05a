"""Builds and runs the inference gRPC server: ChatService, ModelAdmin, health and reflection.

    server = await create_server(config)      # tests: config.grpc_port = 0, then use server.port
    ...
    await server.stop()

`serve(config)` is the long-running form used by `rlhf-online serve-inference`: it also serves Prometheus
metrics and shuts down gracefully on SIGTERM (health NOT_SERVING, in-flight requests drained, outbox flushed).
"""

import asyncio
import ipaddress
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from prometheus_client import start_http_server

from rlhf_online.bootstrap import ensure_initial_policy
from rlhf_online.engine.engine import PolicyEngine, load_policy
from rlhf_online.grpc_decoding import add_servicer
from rlhf_online.health import add_health_and_reflection
from rlhf_online.inference.admin import ModelAdmin
from rlhf_online.inference.chat import ChatService
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.events import KafkaEvents
from rlhf_online.inference.follower import POLICY, ModelFollower
from rlhf_online.inference.journal import Journal
from rlhf_online.inference.signing import ResponseSigner, format_time, random_signer, signer_from_settings
from rlhf_online.inference.tgi_backend import TgiBackend
from rlhf_online.inference.tgi_http import TgiHttp, local_model_info, server_ssl_context
from rlhf_online.proto.rlhf.v1 import admin_pb2, chat_pb2
from rlhf_online.registry import Registry
from rlhf_online.tls import add_port, server_credentials
from rlhf_online.topics import Topics

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"].full_name,
)


@dataclass
class InferenceServer:
    """A running inference server and the parts it owns."""

    server: grpc.aio.Server
    port: int
    engine: PolicyEngine | TgiBackend
    events: KafkaEvents
    follower: ModelFollower | None
    health: health.aio.HealthServicer
    chat: ChatService
    http: TgiHttp | None = None  # the TGI HTTP API, when tgi_port >= 0
    tgi_port: int | None = None

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops taking requests, lets in-flight ones finish within `grace_s`, then releases everything."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        http_stopped = self.http.stop() if self.http is not None else asyncio.sleep(0)
        await asyncio.gather(self.server.stop(grace_s), http_stopped)
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        await asyncio.to_thread(self.engine.stop)
        await asyncio.to_thread(self.events.close)


async def create_server(config: InferenceConfig) -> InferenceServer:
    """Loads the serving policy version, connects to Kafka, starts the gRPC server on `config.grpc_port`."""
    credentials = server_credentials(config)  # first: bad TLS files or keys fail before the model loads
    signer = _signer(config)
    _warn_if_admin_exposed(config, tls=credentials is not None)
    replica = config.replica_id or socket.gethostname()
    topics = Topics(config.topic_prefix)
    registry = Registry(config.registry_dir)
    journal = Journal(config.outbox_dir, fsync=config.outbox_fsync) if config.outbox_dir else None
    events = KafkaEvents(
        config.kafka_bootstrap,
        client_id=f"inference-{replica}",
        ack_timeout_s=config.feedback_ack_timeout_s,
        journal=journal,
    )
    load = lambda path: load_policy(path, device=config.torch_device())  # noqa: E731
    if config.backend == "tgi":
        engine, follower = await _connect_backend(config), None
    else:
        engine, follower = await asyncio.to_thread(_start_engine, config, registry, topics, load, replica)
    chat = ChatService(config, engine, events, signer, topics)
    server = grpc.aio.server()
    add_servicer(server, chat, chat_pb2.DESCRIPTOR.services_by_name["ChatService"])
    if follower is not None:
        admin = ModelAdmin(
            config.admin_token,
            registry,
            follower,
            events,
            topics.models,
            require_protected=not config.allow_insecure_admin,
        )
        add_servicer(server, admin, admin_pb2.DESCRIPTOR.services_by_name["ModelAdmin"])
    health_servicer = health.aio.HealthServicer()
    add_health_and_reflection(server, health_servicer, SERVICE_NAMES)
    port = add_port(server, config.grpc_host, config.grpc_port, credentials)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "inference serving policy %s on %s:%d (%s)",
        engine.version,
        config.grpc_host,
        port,
        ("mutual TLS" if config.tls_client_ca_file else "TLS") if credentials else "plaintext",
    )
    http, tgi_port = await _start_tgi_http(config, chat)
    return InferenceServer(server, port, engine, events, follower, health_servicer, chat, http, tgi_port)


async def _connect_backend(config: InferenceConfig) -> TgiBackend:
    return await TgiBackend.connect(
        config.tgi_url,
        config.base_model_dir,
        timeout_s=config.tgi_timeout_s,
        max_in_flight=config.max_batch_size + config.max_queue,
    )


async def _start_tgi_http(config: InferenceConfig, chat: ChatService) -> tuple[TgiHttp | None, int | None]:
    """The TGI HTTP API on `tgi_port` (off when it is -1)."""
    if config.tgi_port < 0:
        return None, None
    remote = chat.engine if isinstance(chat.engine, TgiBackend) else None
    http = TgiHttp(
        chat,
        remote.model_info() if remote else local_model_info(config.torch_device()),
        max_concurrent_requests=config.max_batch_size + config.max_queue,
        max_batch_size=config.max_batch_size,
        health_check=remote.healthy if remote else None,
        shutdown_grace_s=config.shutdown_grace_s,
    )
    ssl_context = server_ssl_context(config)
    port = await http.start(config.grpc_host, config.tgi_port, ssl_context)
    log.info("TGI HTTP API on %s://%s:%d", "https" if ssl_context else "http", config.grpc_host, port)
    return http, port


def _start_engine(config, registry, topics, load, replica) -> tuple[PolicyEngine, ModelFollower | None]:
    """Serves LATEST. The follower's start is marked first, so no version published meanwhile is missed."""
    follower = None
    if config.follow_models:
        follower = ModelFollower(
            None,
            registry,
            load,
            bootstrap=config.kafka_bootstrap,
            topic=topics.models,
            client_id=f"inference-{replica}-models",
        )
        follower.mark_start()
    version = ensure_initial_policy(registry, Path(config.base_model_dir))
    model_dir = registry.verify(POLICY, version)
    engine = PolicyEngine.from_pretrained(
        model_dir,
        version,
        device=config.torch_device(),
        max_batch_size=config.max_batch_size,
        max_batch_tokens=config.max_batch_tokens or None,
        max_queue=config.max_queue,
    )
    engine.start()
    if follower is not None:
        follower.engine = engine
        follower.start()
    return engine, follower


def _signer(config: InferenceConfig) -> ResponseSigner:
    signer = signer_from_settings(config.signing_key, config.signing_keys)
    if signer is None:
        log.warning(
            "no signing key set: using a random one, so only this replica accepts ratings of its responses; "
            "set RLHF_SIGNING_KEY to the same secret on every replica"
        )
        return random_signer()
    signing, *previous = signer.keys
    log.info("response ids signed with key %r", signing.key_id)
    for key in previous:
        until = format_time(key.retire_at) if key.retire_at is not None else "it leaves signing_keys"
        log.info("response ids of key %r accepted until %s", key.key_id, until)
    return signer


def _warn_if_admin_exposed(config: InferenceConfig, *, tls: bool) -> None:
    """ModelAdmin refuses remote plaintext calls (see ModelAdmin); says so at start, where operators look."""
    if not config.admin_token or tls or config.allow_insecure_admin or _is_loopback(config.grpc_host):
        return
    log.warning(
        "ModelAdmin is served without TLS on %s: it answers callers on this machine only (kubectl "
        "port-forward works); set RLHF_TLS_CERT_FILE and RLHF_TLS_KEY_FILE, or "
        "RLHF_ALLOW_INSECURE_ADMIN=true on a trusted network",
        config.grpc_host,
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


async def serve(config: InferenceConfig) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    if config.metrics_port >= 0:
        start_http_server(config.metrics_port)
    running = await create_server(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down: draining in-flight requests for up to %.0fs", config.shutdown_grace_s)
    await running.stop(config.shutdown_grace_s)
    log.info("inference stopped")
