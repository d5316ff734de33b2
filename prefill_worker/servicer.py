"""PrefillService over gRPC: translates messages, streams the pipeline's layers, maps errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import grpc

from kvfuse.blend import FusedLayer
from kvfuse.errors import KvfuseError
from kvfuse.prefill import check_request_id
from kvfuse.prefill.pipeline import PrefillPipeline
from kvfuse.prefill.warm import Warmer
from kvfuse.service.threads import io_thread
from kvfuse.transport import prefill_messages as messages
from kvfuse.transport import prefill_status as status
from kvfuse.transport.prefill_frames import layer_frames
from kvfuse.v1 import prefill_pb2, prefill_pb2_grpc
from prefill_worker.metrics import PrefillMetrics

log = logging.getLogger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    """Serves `Prefill` (layers are serialized on the RPC thread while the next one computes)
    and `Warm` (computed on the RPC thread, at I/O priority: requests come first).

    A cancelled call (client closed its iterator, deadline) cancels the request's compute and
    fetches through `context.add_callback`. Thread-safe.
    """

    def __init__(self, prefiller: PrefillPipeline, warmer: Warmer, metrics: PrefillMetrics) -> None:
        self._prefiller, self._warmer, self._metrics = prefiller, warmer, metrics

    def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.ServicerContext
    ) -> Iterator[prefill_pb2.PrefillResponse | bytes]:
        start_s, code, mode = time.perf_counter(), grpc.StatusCode.OK, "invalid"
        stream = None
        io_thread()  # only moves bytes: must not stall the compute (kvfuse/service/threads.py)
        self._metrics.in_flight.inc()
        try:
            req = messages.request_from_proto(request)
            mode = req.mode.value
            stream = self._prefiller.stream(req)
            context.add_callback(stream.cancel)
            for item in stream:
                if isinstance(item, FusedLayer):
                    for frame, num_bytes in layer_frames(item):
                        self._metrics.sent_bytes.inc(num_bytes)
                        yield frame  # already serialized (PreEncodedInterceptor)
                else:
                    yield messages.done_to_proto(item, self._prefiller.layout.num_layers)
            if not context.is_active():
                code = grpc.StatusCode.CANCELLED
        except KvfuseError as exc:
            code = status.code_of(exc)
            log.info("prefill %s failed: %s", request.request_id, exc)
            status.abort(context, exc)
        except GeneratorExit:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("prefill %s failed", request.request_id)
            raise
        finally:
            if stream is not None:
                stream.cancel()  # no-op after a complete stream; stops the compute otherwise
            self._metrics.in_flight.dec()
            self._metrics.requests.labels(code.name).inc()
            self._metrics.request_seconds.labels(mode).observe(time.perf_counter() - start_s)

    def Warm(
        self, request: prefill_pb2.WarmRequest, context: grpc.ServicerContext
    ) -> prefill_pb2.WarmResponse:
        io_thread()  # background work: a request's compute thread keeps the cores first
        try:
            check_request_id(request.request_id)
            result = self._warmer.warm_chunks(messages.warm_segments_from_proto(request))
        except KvfuseError as exc:
            log.info("warm %s failed: %s", request.request_id, exc)
            status.abort(context, exc)
        log.info(
            "warm %s: %d objects, %d present, %d stored, %d failed in %.2f s",
            request.request_id, result.num_objects, result.num_present, result.num_stored,
            result.num_failed, result.warm_s,
        )  # fmt: skip
        return messages.warm_result_to_proto(result)
