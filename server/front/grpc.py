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
checked by ``check_grpc_infer``, then its canonical re-encoding is forwarded
(server.front.canonical; every other message re-serialized as protobuf read
it, unknown fields dropped) and Triton's answer (or its status) relayed.
Handlers exist for the exposed methods only: a caller inventing method names
gets refusals that are not cached.
"""

from __future__ import annotations

import hmac
import logging
import re

import grpc
from tritonclient.grpc import service_pb2

from server.front.canonical import grpc_infer_message
from server.front.http import FrontStats
from server.front.inflight import InFlight
from server.front.validate import FrontLimits, RequestRejected, check_grpc_infer

log = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
_KINDS = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata", "ModelConfig": "metadata",
    "ModelStatistics": "statistics", "RepositoryIndex": "repository", "ModelInfer": "infer",
}
_UPSTREAM_MAX_MESSAGE = 256 << 20
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_MODEL_VERSION = re.compile(r"[0-9]{0,18}")


class _Proxy(grpc.GenericRpcHandler):
    """Handlers of the exposed methods, made once each; any other method name
    (callers can invent infinitely many) gets a refusing handler that is not kept."""

    def __init__(self, front: "GrpcFront"):
        self._front = front
        self._handlers = {SERVICE + name: self._forwarding_handler(SERVICE + name, kind)
                          for name, kind in _KINDS.items()}

    def service(self, handler_call_details):
        method = handler_call_details.method
        return self._handlers.get(method) or self._refusing_handler(method)

    def _refusing_handler(self, method: str):
        front = self._front
        message = (f"{method[:200]!r} is not served here (the front exposes health, metadata, model config, "
                   "statistics, repository index and ModelInfer)")

        async def refuse(request: bytes, context):
            front.stats.refused["not_exposed"] += 1
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        if method == SERVICE + "ModelStreamInfer":
            async def refuse_stream(requests, context):
                await refuse(b"", context)
            return grpc.stream_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _forwarding_handler(self, method: str, kind: str):
        front = self._front
        upstream = front.channel.unary_unary(method)
        message_type = getattr(service_pb2, method[len(SERVICE):] + "Request")

        async def forward(request: bytes, context):
            if kind != "health" and front.api_key is not None:
                given = dict(context.invocation_metadata()).get("authorization", "")
                if not hmac.compare_digest(given.encode(), b"Bearer " + front.api_key):
                    front.stats.refused["unauthorized"] += 1
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                        "requires a valid API key in metadata 'authorization: Bearer <key>'")
            caller_bytes, token = request, None
            try:
                if kind == "infer":
                    request, model = _canonical_infer(request, front.limits)
                    token = front.in_flight.opened("grpc", model, context.peer(), caller_bytes)
                else:
                    request = _canonical_message(message_type, request)
            except RequestRejected as exc:
                front.stats.refused["invalid"] += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:  # protobuf's DecodeError and kin
                front.stats.refused["invalid"] += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unparseable {message_type.__name__}: {exc}")
            lost = False
            try:
                answer = await upstream(request, timeout=front.upstream_timeout_s)
            except grpc.aio.AioRpcError as exc:
                lost = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if lost:
                    front.stats.upstream_errors += 1
                    await context.abort(exc.code(), "the inference server is unavailable (restarting?); retry")
                await context.abort(exc.code(), exc.details())
            finally:
                if token is not None:
                    front.in_flight.closed(token, lost)
            front.stats.forwarded += 1
            return answer

        return grpc.unary_unary_rpc_method_handler(forward)


def _canonical_message(message_type, message: bytes) -> bytes:
    """Any other request as protobuf read it, unknown fields dropped."""
    request = message_type.FromString(message)
    request.DiscardUnknownFields()
    return request.SerializeToString()


def _canonical_infer(message: bytes, limits: FrontLimits) -> tuple[bytes, str]:
    """What Triton receives for a ModelInfer message (its canonical re-encoding: server.front.canonical),
    and the model's name."""
    request = service_pb2.ModelInferRequest.FromString(message)
    for what, value, pattern in (("model_name", request.model_name, _MODEL_NAME),
                                 ("model_version", request.model_version, _MODEL_VERSION)):
        if not pattern.fullmatch(value):
            raise RequestRejected(f"the request requires '{what}' matching {pattern.pattern}, got {value[:80]!r}")
    checked = check_grpc_infer(request, limits)
    return grpc_infer_message(checked, request.model_name, request.model_version), request.model_name


class GrpcFront:
    """Serves the public gRPC port on the running asyncio loop; forwards to Triton's private one."""

    def __init__(self, upstream: str, limits: FrontLimits = FrontLimits(), api_key: bytes | None = None,
                 stats: FrontStats | None = None, upstream_timeout_s: float = 60.0, in_flight: InFlight | None = None):
        self.limits = limits
        self.api_key = api_key
        self.stats = stats if stats is not None else FrontStats()
        self.in_flight = in_flight if in_flight is not None else InFlight()
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
