"""Plumbing the kvfuse services share (settings layers, gRPC server and channels, TLS, auth, the
signal loop, the metrics endpoint): the shell around the pure core, never imported by it."""
