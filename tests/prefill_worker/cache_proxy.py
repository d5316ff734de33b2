"""A CacheService pass-through that can hold a GetLayers stream (a test helper process).

`python cache_proxy.py --listen HOST:PORT --target HOST:PORT --pause-at-layer L --arm-file F`
forwards Lookup, Put and GetLayers (with their bearer token) to the real cache server. While
the file F exists, a GetLayers stream stops before its first frame of layer L and stays
there until the process is killed — so a test can kill the server of a stream mid-stream.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from kvfuse.v1 import cache_pb2, cache_pb2_grpc


class Proxy(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, target: str, pause_at_layer: int, arm_file: str) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]
        channel = grpc.insecure_channel(target, options)
        self._stub = cache_pb2_grpc.CacheServiceStub(channel)  # type: ignore[no-untyped-call]
        self._pause_at_layer, self._arm_file = pause_at_layer, arm_file

    @staticmethod
    def _auth(context: grpc.ServicerContext) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]

    def _call(self, method: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(request, metadata=self._auth(context), timeout=30)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())

    def Lookup(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call(self._stub.Lookup, request, context)

    def Put(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        return self._call(self._stub.Put, request_iterator, context)

    def GetLayers(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[cache_pb2.GetLayersResponse]:
        armed = os.path.exists(self._arm_file)
        try:
            for response in self._stub.GetLayers(request, metadata=self._auth(context)):
                if response.WhichOneof("kind") != "frames":
                    yield response
                    continue
                for frame in response.frames.frames:  # one by one, to hold at a layer
                    if armed and frame.layer_idx >= self._pause_at_layer:
                        print(f"holding layer {frame.layer_idx}", flush=True)
                        threading.Event().wait()  # until this process is killed
                    yield cache_pb2.GetLayersResponse(frame=frame)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--pause-at-layer", type=int, default=5)
    parser.add_argument("--arm-file", required=True)
    args = parser.parse_args()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(8), options=options)
    proxy = Proxy(args.target, args.pause_at_layer, args.arm_file)
    cache_pb2_grpc.add_CacheServiceServicer_to_server(proxy, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(args.listen)
    server.start()
    print(f"cache proxy listening on {args.listen}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
