"""PrefillService over gRPC: translates messages, streams the pipeline's layers (or holds them
for a decode engine to take), maps errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import grpc

from kvfuse.blend import FusedLayer
from kvfuse.errors import InvalidRequestError, KvfuseError
from kvfuse.prefill import PrefillRequest, PrefillResult, check_request_id
from kvfuse.prefill.handoff import DIGEST_BYTES, HandoffBoard
from kvfuse.prefill.pipeline import PrefillPipeline
from kvfuse.prefill.warm import Warmer
from kvfuse.service.threads import io_thread
from kvfuse.transport import prefill_messages as messages
from kvfuse.transport import prefill_status as status
from kvfuse.transport.prefill_frames import layer_frames
from kvfuse.v1 import prefill_pb2, prefill_pb2_grpc
from prefill_worker.metrics import PrefillMetrics

log = logging.getLogger(__name__)


MAX_HANDOFF_WAIT_S = 60.0  # longest a TakeFused waits for its Prefill, or for a next layer


class PrefillServicer(prefill_pb2_grpc.PrefillServiceServicer):
    """Serves `Prefill` (layers are serialized on the RPC thread while the next one computes, or
    held on `board` for `TakeFused` when the request names a hand-off id) and `Warm` (computed
    on the RPC thread, at I/O priority: requests come first).

    A cancelled call (client closed its iterator, deadline) cancels the request's compute and
    fetches through `context.add_callback`. Thread-safe.

    Args:
        address: where a hand-off's taker reaches this worker (sent in HandoffAccepted); called
            per hand-off, since the port is known only once the server listens.
    """

    def __init__(
        self,
        prefiller: PrefillPipeline,
        warmer: Warmer,
        metrics: PrefillMetrics,
        board: HandoffBoard,
        address: Callable[[], str],
    ) -> None:
        self._prefiller, self._warmer, self._metrics = prefiller, warmer, metrics
        self._board, self._address = board, address

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
            if req.handoff_id:
                yield from self._hand_off(req, stream)
            else:
                for item in stream:
                    yield from self._encode(item)
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

    def _encode(
        self, item: FusedLayer | PrefillResult
    ) -> Iterator[prefill_pb2.PrefillResponse | bytes]:
        if isinstance(item, FusedLayer):
            for frame, num_bytes in layer_frames(item):
                self._metrics.sent_bytes.inc(num_bytes)
                yield frame  # already serialized (PreEncodedInterceptor)
        else:
            yield messages.done_to_proto(item, self._prefiller.layout.num_layers)

    def _hand_off(
        self, req: PrefillRequest, stream: Iterator[FusedLayer | PrefillResult]
    ) -> Iterator[prefill_pb2.PrefillResponse]:
        """The layers go to the board for `TakeFused`; the caller gets where, then the result."""
        entry = self._board.open(req.handoff_id, req.segments.token_ids)
        try:
            yield prefill_pb2.PrefillResponse(
                handoff=prefill_pb2.HandoffAccepted(address=self._address())
            )
            for item in stream:
                if isinstance(item, FusedLayer):
                    self._board.put(entry, item)
                else:
                    entry.finish(item)
                    yield messages.done_to_proto(item, self._prefiller.layout.num_layers)
        finally:
            if not entry.done:
                self._board.discard(entry, "its prefill failed or was cancelled")

    def TakeFused(
        self, request: prefill_pb2.TakeFusedRequest, context: grpc.ServicerContext
    ) -> Iterator[prefill_pb2.PrefillResponse | bytes]:
        io_thread()
        try:
            check_request_id(request.handoff_id)
            if len(request.token_digest) != DIGEST_BYTES:
                raise InvalidRequestError(f"token_digest must be {DIGEST_BYTES} bytes")
            wait_s = min(max(request.wait_s, 0.0), MAX_HANDOFF_WAIT_S)
            entry = self._board.take(
                request.handoff_id, request.token_digest, request.num_tokens, wait_s
            )
            for item in entry.read(MAX_HANDOFF_WAIT_S):  # the caller's deadline bounds it
                yield from self._encode(item)
        except KvfuseError as exc:
            log.info("take-fused %s failed: %s", request.handoff_id, exc)
            status.abort(context, exc)

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
