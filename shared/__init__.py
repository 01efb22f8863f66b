"""Contracts shared by every editq tier: schemas, settings, formats. Imports neither workers nor controller."""
