"""HTTP routes: openai.py (the /v1 API), ops.py (health, ready, metrics, tokenize), inspect.py."""
