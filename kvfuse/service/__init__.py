"""Plumbing every kvfuse service shares: settings layers, gRPC server and channels, TLS, auth,
the signal loop and the metrics endpoint. The shell around the pure core, never imported by it."""
