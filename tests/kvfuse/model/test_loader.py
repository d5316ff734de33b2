"""Model loading: clear errors for bad paths and unsupported models, cached GGUF conversion."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvfuse.errors import ModelLoadError, UnsupportedModelError
from kvfuse.model.loader import convert_gguf, default_model_path, load_model


def llama_config(**extra: Any) -> dict[str, Any]:
    """A minimal valid Llama `config.json`."""
    return {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        **extra,
    }


def config_dir(tmp_path: Path, config: dict[str, Any]) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_model(missing, tmp_path)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        load_model(tmp_path, tmp_path)


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(config_dir(tmp_path, llama_config()), tmp_path)


def test_weights_not_matching_the_config_are_a_load_error(tmp_path: Path) -> None:
    directory = config_dir(tmp_path, llama_config())
    save_file({"model.embed_tokens.weight": torch.zeros(32, 16)}, str(directory / "w.safetensors"))
    with pytest.raises(ModelLoadError, match="q_proj"):
        load_model(directory, tmp_path)


def test_fused_projections_are_the_concatenated_parts(
    tiny_model_dir: Callable[[str], Path], tmp_path: Path
) -> None:
    """q/k/v (with Qwen2's biases) load as one matmul, parts in order."""
    directory = tiny_model_dir("qwen2")
    state = {}
    for file in directory.glob("*.safetensors"):
        state.update(load_file(str(file)))
    block = load_model(directory, tmp_path).model.blocks[0]
    qkv_proj = block.self_attn.qkv_proj
    for kind in ("weight", "bias"):
        parts = [state[f"model.layers.0.self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
        assert torch.equal(getattr(qkv_proj, kind), torch.cat(parts))


def test_unsupported_architecture(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(config_dir(tmp_path, {"model_type": "gpt2", "n_layer": 2}), tmp_path)


@pytest.mark.parametrize("variant", ["dynamic", "longrope", "yarn"])
@pytest.mark.parametrize("field", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_variant_is_named(tmp_path: Path, field: str, variant: str) -> None:
    config = llama_config(**{field: {"rope_type": variant, "factor": 4.0, "rope_theta": 1e4}})
    with pytest.raises(UnsupportedModelError, match=variant):
        load_model(config_dir(tmp_path, config), tmp_path)


def test_legacy_rope_scaling_type_key_is_read(tmp_path: Path) -> None:
    config = llama_config(rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(config_dir(tmp_path, config), tmp_path)


def test_gguf_conversion_is_cached(smollm_dir: Path, cache_dir: Path) -> None:
    weights = smollm_dir / "model.safetensors"
    mtime_ns = weights.stat().st_mtime_ns
    assert convert_gguf(default_model_path(), cache_dir) == smollm_dir
    assert weights.stat().st_mtime_ns == mtime_ns
    assert not list(smollm_dir.parent.glob(".convert-*"))  # no staging dir left behind


def test_fingerprint_is_stable_across_loads(
    tiny_model_dir: Callable[[str], Path], cache_dir: Path
) -> None:
    first = load_model(tiny_model_dir("qwen2"), cache_dir, torch.float32)
    second = load_model(tiny_model_dir("qwen2"), cache_dir, torch.float32)
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 64


def test_fingerprint_differs_between_models(
    tiny_model_dir: Callable[[str], Path], cache_dir: Path
) -> None:
    fingerprints = {
        load_model(tiny_model_dir(arch), cache_dir, torch.float32).fingerprint
        for arch in ("llama", "qwen2", "qwen3")
    }
    assert len(fingerprints) == 3


def test_fingerprint_covers_weights(
    tiny_model_dir: Callable[[str], Path], cache_dir: Path, tmp_path: Path
) -> None:
    source = tiny_model_dir("qwen3")
    copy = tmp_path / "edited"
    shutil.copytree(source, copy)
    weights = copy / "model.safetensors"
    state = load_file(str(weights))
    state["model.norm.weight"] = state["model.norm.weight"] + 1e-3
    save_file(state, str(weights), metadata={"format": "pt"})
    original = load_model(source, cache_dir, torch.float32).fingerprint
    assert load_model(copy, cache_dir, torch.float32).fingerprint != original
