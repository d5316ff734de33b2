"""The model a decode worker serves: its config, tokenizer and KV dtype, and its weights when
this process decodes (engine `embedded`) — with engine `vllm` the weights live in vLLM."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvfuse.errors import ModelLoadError
from kvfuse.model.config import ModelConfig
from kvfuse.model.loader import LoadedModel, convert_gguf, default_model_path
from kvfuse.model.tokenizer import Tokenizer
from kvfuse.settings import Settings


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP side needs of the model (tokenizing, limits, the model card).

    Attributes:
        cfg: the architecture (context length, vocabulary, KV geometry).
        dtype: the KV dtype (the model's).
        source: the model path as configured (the card's `root`).
        loaded: the weights, ready to decode; None when another engine decodes.
    """

    cfg: ModelConfig
    tokenizer: Tokenizer
    dtype: torch.dtype
    source: str
    loaded: LoadedModel | None = None

    @classmethod
    def of(cls, loaded: LoadedModel) -> ServedModel:
        model = loaded.model
        return cls(model.cfg, loaded.tokenizer, model.dtype, loaded.source, loaded)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        cfg = self.cfg
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize


def load_without_weights(settings: Settings) -> ServedModel:
    """The config and tokenizer of the model `settings` name, without its weights (a GGUF
    file is converted once, as `load_model` does, for its config and tokenizer).

    Raises:
        ModelLoadError: the path does not exist or holds no model.
    """
    path = Path(settings.model) if settings.model else default_model_path()
    is_gguf = path.is_file() and path.suffix == ".gguf"
    directory = convert_gguf(path, settings.cache_dir) if is_gguf else path
    if not (directory / "config.json").is_file():
        raise ModelLoadError(
            f"{str(path)!r} is neither a .gguf file nor a directory with config.json"
        )
    from transformers import AutoTokenizer  # slow import, only here

    cfg = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()))
    tokenizer = Tokenizer(AutoTokenizer.from_pretrained(directory), cfg.eos_token_ids)
    return ServedModel(cfg, tokenizer, settings.torch_dtype, str(path))
