"""`python -m decode_worker` / `kvfuse serve decode` refuse bad settings before loading a model."""

from __future__ import annotations

import subprocess
import sys

import pytest
from decode_helpers import REPO

from decode_worker.serve import add_arguments


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        (["-m", "decode_worker"], ["--port", "70000"], "port"),
        (["-m", "decode_worker"], ["--max-batch", "0"], "max_batch"),
        (["-m", "kvfuse.cli", "serve", "decode"], ["--kv-cache-bytes", "lots"], "byte size"),
    ],
)
def test_bad_flags_exit_2_with_a_message(
    command: list[str], flags: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, *command, *flags], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_every_flag_maps_to_a_setting() -> None:
    import argparse
    import dataclasses

    from decode_worker.config import DecodeConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    dests = {a.dest for a in parser._actions if a.dest not in ("help", "config")}
    assert dests <= fields
