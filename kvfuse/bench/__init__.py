"""Benchmark harness: RAG datasets, answer-quality metrics and result reports."""
