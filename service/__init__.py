"""kvserve's HTTP service: OpenAI-compatible API, health, metrics. No tensors here."""
