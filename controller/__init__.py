"""Controller tier: CLI (and later the Ray controller, batching, routing, rollout, HTTP API)."""
