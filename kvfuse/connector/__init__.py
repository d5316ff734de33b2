"""kvfuse inside stock vLLM: a v1 KV connector (`vllm_connector.KVFuseConnector`).

Two roles, one connector: a request carrying hand-off params loads the fused KV a kvfuse
prefill worker blended for exactly its prompt (vLLM then decodes: prefill/decode
disaggregation with CacheBlend reuse); any other request looks its prompt's blocks up on
kvfuse's cache servers by vLLM's own block hashes, loads the hits and stores the blocks it
computes (cross-instance prefix reuse). Only `vllm_connector` and `paged` import vLLM; the rest
is plain Python and torch, tested without it.
"""
