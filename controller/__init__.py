"""The controller (`kvfuse serve controller`): recompute-ratio policy from measurements, tier
placement from access counts, cache-server membership from Kubernetes or a static list."""
