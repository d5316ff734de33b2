"""LMCache's own `lm://` remote connector driving a server: run inside LMCache's venv by tests.

Usage: `python lmcache_connector_client.py HOST PORT put|get NUM_OBJECTS`. It builds LMCache's
`LMCServerConnector` (lmcache.v1.storage_backend.connector.lm_connector) exactly as a vLLM pod
with `remote_url: lm://HOST:PORT` does, except that its local CPU backend is replaced by
LMCache's own test allocator (`AdHocMemoryAllocator`: fresh tensors, no pinned pool). `put`
stores NUM_OBJECTS deterministic chunks (KV_2LTD, fp16 and bf16 alternately) and reports which
ones EXIST afterwards; `get` reads them back and reports, per object, whether the bytes, shape,
dtype and memory format are those that were put. One JSON object on stdout.

This file imports LMCache, never kvfuse: it runs in `bench/.venvs/lmcache`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from typing import Any

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.memory_allocators.ad_hoc_memory_allocator import AdHocMemoryAllocator
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.metadata import LMCacheMetadata
from lmcache.v1.storage_backend.connector.lm_connector import LMCServerConnector

NUM_LAYERS, CHUNK_TOKENS, NUM_KV_HEADS, HEAD_DIM = 3, 16, 3, 64
MODEL = "kvfuse-compat"


class CpuBackend:
    """What the connector uses of LMCache's LocalCPUBackend: config, metadata, allocate."""

    def __init__(self, config: Any, metadata: Any) -> None:
        self.config, self.metadata = config, metadata
        self._allocator = AdHocMemoryAllocator("cpu")

    def allocate(self, shape: Any, dtype: Any, fmt: Any = None) -> Any:
        return self._allocator.allocate(shape, dtype, fmt or MemoryFormat.KV_2LTD)


def object_of(idx: int) -> tuple[Any, Any]:
    """The idx-th chunk: its key and its tensor [2, L, T, H_kv * D]."""
    dtype = torch.float16 if idx % 2 == 0 else torch.bfloat16
    gen = torch.Generator().manual_seed(1000 + idx)
    shape = (2, NUM_LAYERS, CHUNK_TOKENS, NUM_KV_HEADS * HEAD_DIM)
    kv = torch.randn(shape, generator=gen).to(dtype)
    key = CacheEngineKey(MODEL, 1, 0, 0x5EED0000 + idx, dtype)
    return key, kv


def connector(host: str, port: int, loop: asyncio.AbstractEventLoop) -> Any:
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK_TOKENS, remote_url=f"lm://{host}:{port}", local_cpu=False
    )
    metadata = LMCacheMetadata(
        model_name=MODEL, world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
        kv_dtype=torch.float16, kv_shape=(NUM_LAYERS, 2, CHUNK_TOKENS, NUM_KV_HEADS, HEAD_DIM),
        chunk_size=CHUNK_TOKENS,
    )  # fmt: skip
    return LMCServerConnector(host, port, loop, CpuBackend(config, metadata))


async def put(conn: Any, backend: CpuBackend, num: int) -> dict[str, Any]:
    for idx in range(num):
        key, kv = object_of(idx)
        obj = backend.allocate(kv.shape, kv.dtype, MemoryFormat.KV_2LTD)
        obj.raw_data.copy_(kv.view(torch.uint8).flatten())
        await conn.put(key, obj)
    return {"exists": [await conn.exists(object_of(i)[0]) for i in range(num)]}


async def get(conn: Any, num: int) -> dict[str, Any]:
    found: list[dict[str, Any]] = []
    for idx in range(num):
        key, kv = object_of(idx)
        obj = await conn.get(key)
        if obj is None:
            found.append({"found": False})
            continue
        data = bytes(obj.byte_array)
        found.append({
            "found": True,
            "bytes_equal": data == kv.view(torch.uint8).numpy().tobytes(),
            "sha256": hashlib.sha256(data).hexdigest(),
            "shape": list(obj.get_shape()),
            "dtype": str(obj.get_dtype()),
            "fmt": obj.get_memory_format().name,
            "expected": {"shape": list(kv.shape), "dtype": str(kv.dtype)},
        })  # fmt: skip
    missing = await conn.get(CacheEngineKey(MODEL, 1, 0, 0xDEAD, torch.float16))
    return {"objects": found, "absent_is_none": missing is None}


async def main(host: str, port: int, mode: str, num: int) -> dict[str, Any]:
    conn = connector(host, port, asyncio.get_running_loop())
    try:
        if mode == "put":
            return await put(conn, conn.local_cpu_backend, num)
        return await get(conn, num)
    finally:
        await conn.close()


if __name__ == "__main__":
    host, port, mode, num = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print(json.dumps(asyncio.run(main(host, port, mode, num))))
