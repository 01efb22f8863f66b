"""Who may use the API: API keys and OIDC tokens, scopes, per-key rate limits and quotas, request-size limits."""
