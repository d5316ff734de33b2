"""Getting a loaded model fast before it serves: weights prepared for the CPU, fused kernels.

`prepare` runs once at start-up, so no request waits on it: packing the weights for oneDNN
(bf16 ones widened to fp32 on CPUs without its bf16 kernels, `WeightForm`) takes a fraction of
a second; the fused kernels are built once per machine (about 25 s), then loaded
from torch's extension cache in well under a second.
"""

from __future__ import annotations

import logging
import time

from kvfuse.model import fused
from kvfuse.model.transformer import Linear, Transformer

log = logging.getLogger(__name__)


def pack_weights(model: Transformer) -> None:
    """Prepares every projection's weight for this CPU (see `Linear.pack`)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()


def prepare(model: Transformer, fused_kernels: bool = True) -> float:
    """Packs the weights and, if asked, switches to the fused kernels; returns the seconds it
    took (the start-up cost the services log)."""
    start = time.perf_counter()
    pack_weights(model)
    if fused_kernels:
        fused.use_fused_kernels()
    elapsed = time.perf_counter() - start
    log.info("model prepared in %.1f s (fused kernels: %s)", elapsed, fused.KERNELS.fused)
    return elapsed
