"""Benchmarks of kvserve against transformers and any OpenAI-compatible server (see bench/README.md)."""
