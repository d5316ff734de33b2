"""kvfuse cache server: chunk-keyed KV in tiers memory → local disk → Redis, served over gRPC."""
