"""The HTTP doors: the edit API, the OpenAI-compatible query API, the Ray Serve application."""
