"""The runtime packages import nothing that only the benchmarks and the demo need.

`benchmarks` and its `[bench]` extra (matplotlib, openai) stay out of every service image, so no
module of `kvfuse`, `cache_server`, `prefill_worker`, `decode_worker` or `controller` may load
them, and the `kvfuse` command loads them only when a `bench` subcommand or `demo` runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ("kvfuse", "cache_server", "prefill_worker", "decode_worker", "controller")
BENCH_ONLY = ("benchmarks", "matplotlib", "openai")
# loaded by vLLM inside its own venv, never by a kvfuse process (tests/vllm imports it there)
IN_VLLM_ONLY = ("kvfuse.connector.vllm_connector",)

# Every module of the given packages, then the whole `kvfuse` parser; prints what got imported.
IMPORT_ALL = """
import importlib, json, pkgutil, sys
imported = []
for top in sys.argv[1:]:
    package = importlib.import_module(top)
    imported.append(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if info.name in {skip!r}:
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
from kvfuse.cli import build_parser
build_parser()
print(json.dumps({"imported": imported, "loaded": sorted(sys.modules)}))
"""


def test_runtime_modules_load_no_benchmark_dependency() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL.replace("{skip!r}", repr(IN_VLLM_ONLY)), *RUNTIME],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert {"kvfuse.cli", "cache_server.server", "prefill_worker.server", "decode_worker.app"} <= (
        set(result["imported"])
    )
    leaked = [m for m in result["loaded"] if m.split(".")[0] in BENCH_ONLY]
    assert not leaked
    assert "vllm" not in result["loaded"]  # the connector is the only module that needs it
