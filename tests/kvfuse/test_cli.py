"""The `kvfuse` command as a real process: generate, a clear error on bad input, and the install
hint where the benchmarks are missing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import pytest

SEGMENTS = [
    "--segment",
    "Answer briefly.",
    "--segment",
    "Tom Vell was born in Ardmore.",
    "--segment",
    "Where was Tom Vell born?",
]

INSTALL_HINT = "pip install 'kvfuse[bench]'"


def kvfuse(*args: str, missing: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """`kvfuse args` in a fresh process where the `missing` modules fail to import."""
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({list(missing)!r}))\n"
        "from kvfuse.cli import main\nsys.exit(main())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
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


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (["bench", "blend"], "benchmarks"),
        (["bench", "codecs", "--help"], "matplotlib"),
        (["demo"], "openai"),
    ],
)
def test_benchmarks_not_installed_exit_2_with_the_install_hint(
    command: list[str], missing: str
) -> None:
    proc = kvfuse(*command, missing=[missing])
    assert proc.returncode == 2
    assert f"`kvfuse {' '.join(command[:2])}` needs '{missing}'" in proc.stderr
    assert INSTALL_HINT in proc.stderr
    assert "Traceback" not in proc.stderr


def test_other_commands_work_without_the_benchmarks() -> None:
    proc = kvfuse("bench", "--help", missing=["benchmarks", "matplotlib", "openai"])
    assert proc.returncode == 0, proc.stderr
    assert "codecs" in proc.stdout
    proc = kvfuse("generate", *SEGMENTS, "--max-tokens", "1", missing=["benchmarks"])
    assert proc.returncode == 0, proc.stderr
