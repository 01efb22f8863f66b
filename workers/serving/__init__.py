"""Serving tier: vLLM replicas that hot-swap committed weight versions (see ``replica.py``)."""
