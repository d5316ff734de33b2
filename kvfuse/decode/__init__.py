"""Decoding after a prefill: per-sequence KV caches, single and batched decode steps, scoring."""
