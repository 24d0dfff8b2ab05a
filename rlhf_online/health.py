"""gRPC health + reflection for a service whose work runs in plain threads: grpc.aio on a loop thread.

    health = HealthServer(config.grpc_port, host=config.grpc_host, credentials=server_credentials(config))

With `credentials` (from `rlhf_online.tls.server_credentials`) the port speaks TLS, or mutual TLS.
"""

import asyncio
import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from rlhf_online.grpc_decoding import add_servicer
from rlhf_online.tls import add_port

log = logging.getLogger(__name__)


class HealthServer:
    """Serves `grpc.health.v1.Health` (overall status "") and reflection on `host:port` (0: a free port),
    over TLS when `credentials` is given."""

    def __init__(
        self,
        port: int,
        host: str = "0.0.0.0",
        name: str = "grpc-health",
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.servicer = health.aio.HealthServicer()
        self._server, self.port = self._call(self._start(host, port, credentials))

    async def _start(self, host: str, port: int, credentials) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        add_health_and_reflection(server, self.servicer)
        bound = add_port(server, host, port, credentials)
        await server.start()
        return server, bound

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._call(self.servicer.set("", status))

    def stop(self, grace_s: float = 2.0) -> None:
        """NOT_SERVING, then stops the server and its loop."""
        self.set_serving(False)
        self._call(self._server.stop(grace_s))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=grace_s + 5)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)


def add_health_and_reflection(
    server: grpc.aio.Server, servicer: health.aio.HealthServicer, service_names: tuple[str, ...] = ()
) -> None:
    """Serves `servicer` as grpc.health.v1.Health, and reflection listing `service_names` and both of these,
    with malformed requests refused like every other method (`rlhf_online.grpc_decoding`)."""
    add_servicer(server, servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    add_servicer(
        server,
        reflection.aio.ReflectionServicer(names),
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
