"""Input checks, tensor/byte conversion and directed fp16 rounding shared by the codecs."""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from kvfuse.codecs.header import DTYPE_CODES, check_dims
from kvfuse.errors import CodecError

# torch has no read-only tensors and warns when it wraps a read-only array (a view of a payload
# passed to `Codec.decode_owned`, which documents the sharing). Filtered for this module only,
# once: `warnings.catch_warnings` per call would race with other threads' warning filters.
warnings.filterwarnings(
    "ignore", "The given NumPy array is not writable", UserWarning, module=__name__
)

# Largest finite fp16 value; quantization parameters stored as fp16 must stay below it.
FP16_MAX = 65504.0


def check_kv(k: Tensor, v: Tensor, layer_idx: int, num_layers: int) -> tuple[Tensor, Tensor]:
    """Validates one layer's K and V and returns them as contiguous CPU tensors.

    Shape: k, v [T, H_kv, D], same shape and dtype, dtype float32/float16/bfloat16.

    Raises:
        CodecError: wrong types, ranks, shapes, dtypes, sizes, or layer index.
    """
    if not isinstance(k, Tensor) or not isinstance(v, Tensor):
        raise CodecError("k and v must be torch tensors")
    if k.dim() != 3 or k.shape != v.shape:
        raise CodecError(
            f"k and v must both be [T, H_kv, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != v.dtype or k.dtype not in DTYPE_CODES:
        raise CodecError(
            f"k and v must share a float32/float16/bfloat16 dtype, got {k.dtype}, {v.dtype}"
        )
    check_dims(*k.shape)
    if not 0 <= layer_idx < num_layers:
        raise CodecError(f"layer_idx {layer_idx} outside [0, {num_layers})")
    return k.detach().cpu().contiguous(), v.detach().cpu().contiguous()


def check_finite(*tensors: Tensor) -> None:
    """Raises CodecError if any value is NaN or infinite (lossy codecs cannot scale them)."""
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise CodecError("lossy codecs need finite K/V values (found NaN or inf)")


def to_bytes(t: Tensor) -> bytes:
    """Little-endian bytes of a contiguous CPU tensor in its own dtype (bf16 as 16-bit words)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    array: npt.NDArray[np.generic] = t.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def from_array(
    array: npt.NDArray[np.generic], dtype: torch.dtype, shape: tuple[int, ...]
) -> Tensor:
    """A tensor of `dtype` and `shape` from an array read by `to_bytes`' inverse.

    `array` holds int16 words when `dtype` is bfloat16, else items of `dtype` itself. A
    read-only array (a view of an owned payload, `Codec.decode_owned`) is shared, not copied.
    """
    t = torch.from_numpy(array).reshape(shape)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def numpy_dtype(dtype: torch.dtype) -> npt.DTypeLike:
    """The numpy item type `to_bytes` writes for a torch float dtype."""
    return {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}[dtype]


def fp16_floor(x: Tensor) -> Tensor:
    """The largest fp16 values <= x (elementwise), so a stored lower bound never rises."""
    h = x.to(torch.float16)
    below = torch.nextafter(h, torch.full_like(h, -float("inf")))
    return torch.where(h.float() > x, below, h)


def fp16_ceil(x: Tensor) -> Tensor:
    """The smallest positive fp16 values >= x (elementwise), so a stored step never shrinks.

    Zero and negative inputs give the smallest positive fp16 subnormal, so steps are never 0.
    """
    h = x.clamp_min(0).to(torch.float16)
    above = torch.nextafter(h, torch.full_like(h, float("inf")))
    h = torch.where(h.float() < x, above, h)
    return torch.where(h > 0, h, torch.full_like(h, 2.0**-24))


def check_fp16_range(*tensors: Tensor) -> None:
    """Raises CodecError if a quantization parameter overflowed fp16."""
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            raise CodecError(
                f"K/V values too large for fp16 quantization parameters (> {FP16_MAX})"
            )
