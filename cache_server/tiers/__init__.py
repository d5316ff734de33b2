"""Storage tiers of the cache server: memory, local disk, Redis."""
