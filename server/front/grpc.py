"""The gRPC front: the only gRPC endpoint callers reach, in front of Triton's private one.

Why a front for gRPC too: Triton 2.51's gRPC server compares each input's
declared and carried bytes (declared shapes of 10^10 or 2^63 are refused
cleanly), but it accepts any message up to 2 GiB and copies it into the
model's process (a 500 MB request took 8.6 s and grew the server by 1.7 GB),
and its own API-key check (``--grpc-restricted-protocol``) takes the key on
the command line, where every local user can read it.

Per call: method allow-list (health is open; metadata, config, statistics,
repository index and ModelInfer need the key when one is set; shared memory,
model load/unload, trace and log settings are refused), message size bounded
by gRPC itself (``max_receive_message_length`` = ``max_body_bytes``:
RESOURCE_EXHAUSTED before the message is read whole), ModelInfer parsed and
checked by ``check_grpc_infer``, then the serialized bytes are forwarded
unchanged and Triton's answer (or its status) relayed.
"""

from __future__ import annotations

import hmac
import logging

import grpc
from tritonclient.grpc import service_pb2

from server.front.http import FrontStats
from server.front.validate import FrontLimits, RequestRejected, check_grpc_infer

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
_KINDS = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata", "ModelConfig": "metadata",
    "ModelStatistics": "statistics", "RepositoryIndex": "repository", "ModelInfer": "infer",
}
_UPSTREAM_MAX_MESSAGE = 256 << 20


class _Proxy(grpc.GenericRpcHandler):
    def __init__(self, front: "GrpcFront"):
        self._front = front
        self._handlers = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            handler = self._handlers[method] = self._make_handler(method)
        return handler

    def _make_handler(self, method: str):
        name = method[len(SERVICE):] if method.startswith(SERVICE) else None
        kind = _KINDS.get(name)
        front = self._front
        if kind is None:
            async def refuse(request: bytes, context):
                front.stats.refused["not_exposed"] += 1
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method} is not served here (the front exposes health, metadata, model config, "
                                    "statistics, repository index and ModelInfer)")
            if name == "ModelStreamInfer":
                async def refuse_stream(requests, context):
                    await refuse(b"", context)
                return grpc.stream_stream_rpc_method_handler(refuse_stream)
            return grpc.unary_unary_rpc_method_handler(refuse)

        upstream = front.channel.unary_unary(method)

        async def forward(request: bytes, context):
            if kind != "health" and front.api_key is not None:
                given = dict(context.invocation_metadata()).get("authorization", "")
                if not hmac.compare_digest(given.encode(), b"Bearer " + front.api_key):
                    front.stats.refused["unauthorized"] += 1
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        "requires a valid API key in metadata 'authorization: Bearer <key>'")
            if kind == "infer":
                try:
                    check_grpc_infer(service_pb2.ModelInferRequest.FromString(request), front.limits)
                except RequestRejected as exc:
                    front.stats.refused["invalid"] += 1
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                except Exception as exc:  # protobuf's DecodeError and kin
                    front.stats.refused["invalid"] += 1
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unparseable ModelInferRequest: {exc}")
            try:
                answer = await upstream(request, timeout=front.upstream_timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    front.stats.upstream_errors += 1
                    await context.abort(exc.code(), "the inference server is unavailable (restarting?); retry")
                await context.abort(exc.code(), exc.details())
            front.stats.forwarded += 1
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)


class GrpcFront:
    """Serves the public gRPC port on the running asyncio loop; forwards to Triton's private one."""

    def __init__(self, upstream: str, limits: FrontLimits = FrontLimits(), api_key: bytes | None = None,
                 stats: FrontStats | None = None, upstream_timeout_s: float = 60.0):
        self.limits = limits
        self.api_key = api_key
        self.stats = stats if stats is not None else FrontStats()
        self.upstream_timeout_s = upstream_timeout_s
        self._upstream = upstream
        self.channel = None
        self._server = None

    async def start(self, host: str, port: int) -> int:
        self.channel = grpc.aio.insecure_channel(self._upstream, options=[
            ("grpc.max_receive_message_length", _UPSTREAM_MAX_MESSAGE),
            ("grpc.max_send_message_length", self.limits.max_body_bytes + 4096),
        ])
        self._server = grpc.aio.server(handlers=[_Proxy(self)], options=[
            ("grpc.max_receive_message_length", self.limits.max_body_bytes),
            ("grpc.max_send_message_length", _UPSTREAM_MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ])
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind the gRPC front to {host}:{port}")
        await self._server.start()
        return bound

    async def close(self, grace_s: float = 1.0):
        if self._server is not None:
            await self._server.stop(grace_s)
        if self.channel is not None:
            await self.channel.close()
