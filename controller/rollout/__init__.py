"""From a committed version to served traffic: the replica router, the canary-first rolling rollout and
zero-downtime restarts."""
