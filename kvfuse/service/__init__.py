"""Plumbing the kvfuse services and the client SDK share (settings layers, gRPC server and
channels, TLS, auth, signal loop, metrics endpoint); model, blend and KV code never import it."""
