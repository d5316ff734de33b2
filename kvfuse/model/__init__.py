"""Decoder-only transformer runner: config, weights, tokenizer, sampling."""
