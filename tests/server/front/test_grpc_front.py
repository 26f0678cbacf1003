"""server.front.grpc without a server: the handler table stays the size of the exposed methods."""

import asyncio
from types import SimpleNamespace

import grpc

from server.front.grpc import _KINDS, SERVICE, GrpcFront, _Proxy


def test_invented_method_names_do_not_grow_the_handler_table():
    async def run():
        front = GrpcFront("127.0.0.1:1")
        front.channel = grpc.aio.insecure_channel("127.0.0.1:1")
        try:
            proxy = _Proxy(front)
            for i in range(10_000):
                assert proxy.service(SimpleNamespace(method=f"{SERVICE}Invented{i}")) is not None
            assert proxy.service(SimpleNamespace(method=SERVICE + "ModelInfer")) is \
                proxy.service(SimpleNamespace(method=SERVICE + "ModelInfer"))
            return len(proxy._handlers)
        finally:
            await front.channel.close()

    assert asyncio.run(run()) == len(_KINDS)
