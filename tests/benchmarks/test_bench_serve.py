"""`kvfuse bench serve` end to end against a fake OpenAI endpoint (no model): plan, rows, files."""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from benchmarks import serve
from benchmarks.serve_plan import make_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Endpoint(ThreadingHTTPServer):
    """The fake endpoint: what it was sent, chat bodies and warm bodies."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies: list[dict[str, Any]] = []
        self.warmed: list[dict[str, Any]] = []


class _Handler(BaseHTTPRequestHandler):
    """Answers every chat request with one word and kvfuse usage; records the bodies."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert isinstance(self.server, _Endpoint)
        if self.path == "/kvfuse/warm":
            self.server.warmed.append(body)
            num = len(body["documents"])
            answer = {"objects": num + 1, "present": 1, "stored": num, "computed_tokens": 7 * num}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.server.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        mode = (body.get("kvfuse") or {}).get("mode")
        hits = 4 if mode == "blend" else 0
        usage = {"prompt_tokens": 9, "kvfuse": {"chunks": 6, "chunk_hits": hits}}
        events = [
            {"choices": [{"delta": {"content": "Paris"}, "finish_reason": None}]},
            {"choices": [{"delta": {}, "finish_reason": "length"}]},
            {"choices": [], "usage": usage},
        ]
        for event in events:
            self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture
def endpoint() -> Iterator[_Endpoint]:
    server = _Endpoint()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def musique(tmp_path: Path) -> Path:
    entries = [
        {"ctxs": [{"title": f"T{q}-{i}", "text": f"Text {q} {i}."} for i in range(10)],
         "question": f"Question {q}?", "answers": ["x"]}
        for q in range(5)
    ]  # fmt: skip
    path = tmp_path / "musique.json"
    path.write_text(json.dumps(entries))
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_against_an_endpoint_writes_rows_ratios_and_plot(
    endpoint: _Endpoint, musique: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{endpoint.server_address[1]}"
    out = tmp_path / "results"
    args = _args(
        "--endpoint", url, "--systems", "full_prefill,blend", "--dtypes", "float32",
        "--concurrency", "1,2", "--num-cold", "1", "--num-steady", "3",
        "--musique-path", str(musique), "--out", str(out), "--num-docs", "3",
    )  # fmt: skip
    assert serve.run(args) == 0
    result = json.loads((out / "serve.json").read_text())
    rows = result["rows"]
    assert [(r["system"], r["phase"], r["concurrency"]) for r in rows] == [
        ("full_prefill", "cold", 1), ("full_prefill", "steady", 1), ("full_prefill", "steady", 2),
        ("blend", "cold", 1), ("blend", "steady", 1), ("blend", "steady", 2),
    ]  # fmt: skip
    assert all(r["num_errors"] == 0 and r["ttft_p50_s"] > 0 for r in rows)
    assert rows[4]["chunk_hit_rate"] == pytest.approx(4 / 6)
    assert rows[4]["ttft_speedup_vs_full"] is not None
    assert result["missing"] == {} and result["kv_sources"] == []  # no stacks with --endpoint
    assert result["config"]["num_steady"] == 3 and result["machine"]["cpus"] >= 1
    assert (out / "serve.png").read_bytes().startswith(PNG_MAGIC)
    bodies = endpoint.bodies
    assert len(bodies) == 2 * (1 + 3 + 3)
    assert {b["kvfuse"]["mode"] for b in bodies} == {"full_prefill", "blend"}
    blend = [b for b in bodies if b["kvfuse"]["mode"] == "blend"]
    assert all(b["kvfuse"]["recompute_ratio"] == 0.15 for b in blend)

    def requests(bodies: list[dict[str, Any]]) -> list[str]:  # arrival order varies at C=2
        return sorted(json.dumps(b["kvfuse"]["segments"]) for b in bodies)

    assert requests(bodies[:7]) == requests(blend)  # every system gets the very same requests


def test_blend_ingest_stores_the_popular_passages_first(
    endpoint: _Endpoint, musique: Path, tmp_path: Path
) -> None:
    url = f"http://127.0.0.1:{endpoint.server_address[1]}"
    args = _args(
        "--endpoint", url, "--systems", "blend_ingest", "--dtypes", "float32",
        "--concurrency", "1", "--num-cold", "1", "--num-steady", "2", "--warm-top", "40",
        "--musique-path", str(musique), "--out", str(tmp_path), "--num-docs", "3",
    )  # fmt: skip
    assert serve.run(args) == 0
    warmed = endpoint.warmed
    assert [len(w["documents"]) for w in warmed] == [32, 8]  # batches of warm_documents
    plan = make_plan(args)
    assert [d for w in warmed for d in w["documents"]] == list(plan.ingest)
    assert all(w["system"] == warmed[0]["system"] and w["chat"] for w in warmed)
    rows = json.loads((tmp_path / "serve.json").read_text())["rows"]
    assert [(r["system"], r["phase"]) for r in rows] == [
        ("blend_ingest", "cold"),
        ("blend_ingest", "steady"),
    ]
    bodies = endpoint.bodies
    assert {b["kvfuse"]["mode"] for b in bodies} == {"blend"}
    assert bodies[0]["messages"][0]["content"] == warmed[0]["system"]  # the chats' framing
