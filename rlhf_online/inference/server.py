"""Builds and runs the inference gRPC server: ChatService, ModelAdmin, health and reflection.

    server = await create_server(config)      # tests: config.grpc_port = 0, then use server.port
    ...
    await server.stop()

`serve(config)` is the long-running form used by `rlhf-online serve-inference`: it also serves Prometheus
metrics and shuts down gracefully on SIGTERM (health NOT_SERVING, in-flight requests drained, outbox flushed).
"""

import asyncio
import logging
import secrets
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from rlhf_online.bootstrap import ensure_initial_policy
from rlhf_online.engine.engine import PolicyEngine, load_policy
from rlhf_online.inference.admin import ModelAdmin
from rlhf_online.inference.chat import ChatService
from rlhf_online.inference.config import InferenceConfig
from rlhf_online.inference.events import KafkaEvents
from rlhf_online.inference.follower import POLICY, ModelFollower
from rlhf_online.inference.signing import ResponseSigner
from rlhf_online.proto.rlhf.v1 import admin_pb2, admin_pb2_grpc, chat_pb2, chat_pb2_grpc
from rlhf_online.registry import Registry
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
    engine: PolicyEngine
    events: KafkaEvents
    follower: ModelFollower | None
    health: health.HealthServicer
    chat: ChatService

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stops taking requests, lets in-flight ones finish within `grace_s`, then releases everything."""
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace_s)
        if self.follower is not None:
            await asyncio.to_thread(self.follower.stop)
        await asyncio.to_thread(self.engine.stop)
        await asyncio.to_thread(self.events.close)


async def create_server(config: InferenceConfig) -> InferenceServer:
    """Loads the serving policy version, connects to Kafka, starts the gRPC server on `config.grpc_port`."""
    replica = config.replica_id or socket.gethostname()
    topics = Topics(config.topic_prefix)
    registry = Registry(config.registry_dir)
    events = KafkaEvents(
        config.kafka_bootstrap, client_id=f"inference-{replica}", ack_timeout_s=config.feedback_ack_timeout_s
    )
    load = lambda path: load_policy(path, device=config.torch_device())  # noqa: E731
    engine, follower = await asyncio.to_thread(_start_engine, config, registry, topics, load, replica)
    chat = ChatService(config, engine, events, _signer(config), topics)
    server = grpc.aio.server()
    chat_pb2_grpc.add_ChatServiceServicer_to_server(chat, server)
    if follower is not None:
        admin = ModelAdmin(config.admin_token, registry, follower, events, topics.models)
        admin_pb2_grpc.add_ModelAdminServicer_to_server(admin, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{config.grpc_host}:{config.grpc_port}")
    if port == 0:
        raise OSError(f"cannot bind gRPC port {config.grpc_host}:{config.grpc_port}; is it taken?")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("inference serving policy %s on %s:%d", engine.version, config.grpc_host, port)
    return InferenceServer(server, port, engine, events, follower, health_servicer, chat)


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
        max_queue=config.max_queue,
    )
    engine.start()
    if follower is not None:
        follower.engine = engine
        follower.start()
    return engine, follower


def _signer(config: InferenceConfig) -> ResponseSigner:
    if config.signing_key:
        return ResponseSigner(config.signing_key.encode())
    log.warning(
        "no signing key set: using a random one, so only this replica accepts ratings of its responses; "
        "set RLHF_SIGNING_KEY to the same secret on every replica"
    )
    return ResponseSigner(secrets.token_bytes(32))


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
