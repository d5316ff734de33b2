"""vLLM's paged KV on the CPU, read and written by token slot and by block.

Each layer's cache is one tensor `[num_blocks, H_kv, block_size, 2 * D]`: per (block, head)
slab, K occupies the first `block_size * D` elements and V the rest, in an order vLLM's CPU
attention packs per ISA (column-major K for `vec`, VNNI tiles for `amx`, …). Raw copies of
`[T, H, D]` rows are therefore wrong. The order is learned once, at start-up, from vLLM's own
cache-write op (`write_fn`): a probe block whose every element holds its own index is written,
and where each index landed is kept. Loads and saves then move elements with numpy indexing on
the caller's thread: vLLM's op — and torch's own indexing, inside vLLM's process — start an
OpenMP team whose threads keep spinning on the cores a colocated prefill worker needs
(measured: a 0.66 s prefill took 3.3 s while a load wrote with torch indexing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# write_fn(k, v, key_cache, value_cache, slots): k, v [n, H_kv, D]; the caches are the K and V
# halves of one layer's tensor viewed [num_blocks, H_kv, block_size, D]; slots [n] int64.
WriteFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], None]


def slot_mapping(block_ids: Sequence[int], block_size: int, start: int, end: int) -> Tensor:
    """Slots of the prompt positions [start, end) in a request's blocks. Shape: [end - start]."""
    positions = torch.arange(start, end, dtype=torch.long)
    blocks = torch.tensor(block_ids, dtype=torch.long)[positions // block_size]
    return blocks * block_size + positions % block_size


def _halves(cache: Tensor) -> tuple[Tensor, Tensor]:
    """The K and V views of a layer's cache, each [num_blocks, H_kv, block_size, D]."""
    num_blocks, num_kv_heads, block_size, _ = cache.shape
    slabs = cache.view(num_blocks, num_kv_heads, 2 * block_size, -1)
    return slabs[:, :, :block_size], slabs[:, :, block_size:]


def probe_offsets(
    shape: tuple[int, int, int], dtype: torch.dtype, write_fn: WriteFn
) -> tuple[Tensor, Tensor]:
    """Where `write_fn` puts each element of a block's rows: for K and for V, the offset in the
    block's memory of element (row, head, column), flattened. Shape: 2 × [block_size * H_kv * D].

    Values above 256 are not exact in bf16, so each index is written as two bytes, in two
    writes. Raises RuntimeError unless the write is a permutation of the block's memory.
    """
    num_kv_heads, block_size, head_dim = shape
    block = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = _halves(block)
    num_elems = block_size * num_kv_heads * head_dim
    index = torch.arange(num_elems)
    digits = []
    for digit in (index % 256, index // 256):
        rows = digit.to(dtype).view(block_size, num_kv_heads, head_dim).contiguous()
        write_fn(rows, rows, key_cache, value_cache, torch.arange(block_size))
        digits.append(block.reshape(-1).double())
    written = (digits[1] * 256 + digits[0]).long()  # [2 * num_elems]: index held per offset
    offsets = torch.arange(2 * num_elems).view(num_kv_heads, 2 * block_size, head_dim)
    result: list[Tensor] = []
    for half in offsets.chunk(2, dim=1):  # offsets of the K region, then of the V region
        region = half.reshape(-1)
        where = torch.full((num_elems,), -1, dtype=torch.long)
        where[written[region]] = region
        if not torch.equal(written[region].sort().values, index):
            raise RuntimeError("vLLM's cache write is not a permutation of a block's rows")
        result.append(where)
    return result[0], result[1]


@dataclass(frozen=True)
class PagedKV:
    """The per-layer cache tensors of one vLLM worker with the offsets to use them.

    Writes happen on loader threads while vLLM runs other requests: they touch only the
    blocks of requests that are waiting for their load, which vLLM does not schedule.

    Attributes:
        caches: layer index → its cache tensor [num_blocks, H_kv, block_size, 2 * D].
        offsets: `probe_offsets` of the layout (K, V).
    """

    caches: tuple[Tensor, ...]
    offsets: tuple[Tensor, Tensor]

    @classmethod
    def probe(cls, caches: Sequence[Tensor], write_fn: WriteFn) -> PagedKV:
        """Learns the block layout from `write_fn` on a scratch block shaped like `caches`."""
        _, num_kv_heads, block_size, double_d = caches[0].shape
        shape = (num_kv_heads, block_size, double_d // 2)
        return cls(tuple(caches), probe_offsets(shape, caches[0].dtype, write_fn))

    @property
    def block_size(self) -> int:
        return int(self.caches[0].shape[2])

    @property
    def num_kv_heads(self) -> int:
        return int(self.caches[0].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.caches[0].shape[3]) // 2

    @property
    def dtype(self) -> torch.dtype:
        return self.caches[0].dtype

    def _block_numel(self) -> int:
        return self.caches[0][0].numel()

    def slot_offsets(self, slots: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Offsets in a layer's memory of the K and V elements of the rows at `slots`, in
        (head, row, column) order. Shape: 2 × [H_kv * n * D]. The same for every layer."""
        num_kv_heads, head_dim = self.num_kv_heads, self.head_dim
        blocks, rows = (slots // self.block_size).numpy(), (slots % self.block_size).numpy()
        heads, cols = np.arange(num_kv_heads), np.arange(head_dim)
        # element (h, i, d) is row rows[i]'s (h, d): index (rows[i] * H + h) * D + d
        elems = (rows[None, :, None] * num_kv_heads + heads[:, None, None]) * head_dim + cols
        base = (blocks * self._block_numel())[None, :, None]
        k_off, v_off = (off.numpy() for off in self.offsets)
        return (base + k_off[elems]).reshape(-1), (base + v_off[elems]).reshape(-1)

    def write(
        self, layer_idx: int, k: Tensor, v: Tensor, offsets: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """Writes rows at `slot_offsets`, with numpy only. Shape: k, v [H_kv, n, D] (strided
        views are fine), of this cache's dtype."""
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(f"KV of {k.dtype} for a {self.dtype} cache")
        flat = _bits(self.caches[layer_idx].view(-1))
        flat[offsets[0]] = _bits(k).reshape(-1)
        flat[offsets[1]] = _bits(v).reshape(-1)

    def copy_blocks(self, block_ids: Sequence[int]) -> list[Tensor]:
        """The blocks' raw memory, one tensor per layer [n, H_kv, block_size, 2 * D]: a quick
        copy on the step's thread, unpacked later (`unpack`) while the blocks may be reused."""
        index = torch.tensor(block_ids, dtype=torch.long)
        return [cache.index_select(0, index) for cache in self.caches]

    def unpack(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of copied blocks. Shape: raw [n, H_kv, bs, 2D] → k, v [n, bs, H_kv, D]."""
        flat = _bits(raw.reshape(raw.shape[0], -1))
        shape = (raw.shape[0], self.block_size, self.num_kv_heads, self.head_dim)
        k, v = (torch.from_numpy(flat[:, off.numpy()]) for off in self.offsets)
        return k.view(raw.dtype).view(shape), v.view(raw.dtype).view(shape)


def _bits(tensor: Tensor) -> np.ndarray:
    """A numpy view of a tensor's elements as same-size integers (numpy has no bfloat16)."""
    return tensor.view(_INT_OF_SIZE[tensor.element_size()]).numpy()
