"""`rlhf.v1.ModelAdmin`: GetModel, ListVersions and Rollback, for operators holding the admin token."""

import asyncio
import hmac
import logging

import grpc

from rlhf_online.contract import POLICY, model_event, model_event_key
from rlhf_online.inference.events import PublishError
from rlhf_online.inference.follower import ModelFollower
from rlhf_online.proto.rlhf.v1 import admin_pb2, admin_pb2_grpc, events_pb2
from rlhf_online.registry import Manifest, Registry, RegistryError, VersionNotFound
from rlhf_online.tls import is_protected

log = logging.getLogger(__name__)
_MAX_VERSION_CHARS = 64


class ModelAdmin(admin_pb2_grpc.ModelAdminServicer):
    """Operator API; every call needs `authorization: Bearer <admin token>` metadata, and with
    `require_protected` a TLS connection or a peer on this machine, so the token is never sent in clear text
    over a network (docs/security.md)."""

    def __init__(
        self,
        admin_token: str,
        registry: Registry,
        follower: ModelFollower,
        events,
        models_topic: str,
        ack_timeout_s: float = 10.0,
        require_protected: bool = True,
    ) -> None:
        self._token, self._require_protected = admin_token, require_protected
        self.registry, self.follower, self.events = registry, follower, events
        self.models_topic, self.ack_timeout_s = models_topic, ack_timeout_s
        self._rollback_lock = asyncio.Lock()

    # The version this replica serves now.
    async def GetModel(self, request, context) -> admin_pb2.ModelInfo:
        await self._authorize(context)
        version = self.follower.engine.version
        return self._info(self.registry.manifest(POLICY, version))

    # Policy versions in the registry, newest first.
    async def ListVersions(self, request, context) -> admin_pb2.ListVersionsResponse:
        await self._authorize(context)
        versions = reversed(self.registry.versions(POLICY))
        return admin_pb2.ListVersionsResponse(
            versions=[self._info(self.registry.manifest(POLICY, v)) for v in versions]
        )

    # Serves an earlier version on every replica: LATEST moves back and a ROLLED_BACK event tells the others.
    async def Rollback(self, request: admin_pb2.RollbackRequest, context) -> admin_pb2.RollbackResponse:
        await self._authorize(context)
        if len(request.version) > _MAX_VERSION_CHARS:  # the registry's message would echo all of it
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"version is {len(request.version)} characters; versions are named like 'v000001' "
                "(see ListVersions)",
            )
        async with self._rollback_lock:
            previous = self.follower.engine.version
            try:
                manifest = await asyncio.to_thread(self.registry.manifest, POLICY, request.version)
                await asyncio.to_thread(self.registry.verify, POLICY, request.version)
            except VersionNotFound as e:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
            except RegistryError as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"cannot roll back to it: {e}")
            latest_before = self.registry.latest(POLICY)
            await asyncio.to_thread(self.registry.set_latest, POLICY, request.version)
            event = model_event(
                POLICY, events_pb2.ROLLED_BACK, request.version, parent_version=manifest.parent_version
            )
            try:
                await asyncio.to_thread(
                    self.events.publish_acked,
                    self.models_topic,
                    model_event_key(event),
                    event.SerializeToString(),
                    self.ack_timeout_s,
                )
            except PublishError as e:
                if latest_before:
                    await asyncio.to_thread(self.registry.set_latest, POLICY, latest_before)
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"rollback not done, retry later: {e}")
            await asyncio.to_thread(self._swap_now, event)
            log.warning("rolled back policy from %s to %s", previous, request.version)
            return admin_pb2.RollbackResponse(version=request.version, previous_version=previous)

    def _swap_now(self, event: events_pb2.ModelEvent) -> None:
        if not self.follower.apply(event) or not self.follower.engine.wait_swapped(event.version, timeout=60):
            raise RuntimeError(f"policy {event.version} verified but did not load; see the server log")

    async def _authorize(self, context) -> None:
        if not self._token:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "ModelAdmin is disabled on this server; set RLHF_ADMIN_TOKEN to enable it",
            )
        if self._require_protected and not is_protected(context):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "ModelAdmin needs a TLS connection so the admin token is not sent in clear text; connect "
                "with TLS (the server sets RLHF_TLS_CERT_FILE and RLHF_TLS_KEY_FILE), call from the server's "
                "machine (e.g. kubectl port-forward), or set RLHF_ALLOW_INSECURE_ADMIN=true on a trusted "
                "network; rotate the token if it crossed an untrusted one",
            )
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("authorization", "")
        if not given:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing admin token; send metadata 'authorization: Bearer <token>'",
            )
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the admin token is not valid")

    def _info(self, manifest: Manifest) -> admin_pb2.ModelInfo:
        return admin_pb2.ModelInfo(
            version=manifest.version,
            parent_version=manifest.parent_version or "",
            created_at_ms=manifest.created_at_ms,
            metrics=manifest.metrics,
            serving=manifest.version == self.follower.engine.version,
        )
