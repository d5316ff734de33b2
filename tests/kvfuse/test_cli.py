"""The `kvfuse` command as a real process: generate, and a clear error on bad input."""

from __future__ import annotations

import subprocess
import sys

SEGMENTS = [
    "--segment",
    "Answer briefly.",
    "--segment",
    "Tom Vell was born in Ardmore.",
    "--segment",
    "Where was Tom Vell born?",
]


def kvfuse(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvfuse.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_generate_prints_answer_and_stats() -> None:
    proc = kvfuse("generate", *SEGMENTS, "--max-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "ttft=" in proc.stderr and "chunk_hits=0/1" in proc.stderr


def test_generate_splits_on_the_separator() -> None:
    prompt = "Answer briefly.<|kvfuse_sep|>Tom Vell was born in Ardmore.<|kvfuse_sep|>Where?"
    proc = kvfuse("generate", prompt, "--max-tokens", "2", "--mode", "full_reuse")
    assert proc.returncode == 0, proc.stderr
    assert "chunk_hits=0/1" in proc.stderr


def test_bad_ratio_exits_2_with_a_message() -> None:
    proc = kvfuse("generate", *SEGMENTS, "--ratio", "1.5")
    assert proc.returncode == 2
    assert "recompute_ratio must be in [0, 1]" in proc.stderr


def test_unknown_model_path_exits_2_naming_it() -> None:
    proc = kvfuse("generate", *SEGMENTS, "--model", "/nonexistent/model.gguf")
    assert proc.returncode == 2
    assert "/nonexistent/model.gguf" in proc.stderr
