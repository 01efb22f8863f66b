"""Settings of the serving tier: the ``serving_*`` fields of ``shared.settings.Settings`` (``EDITQ_SERVING_*``).

``ServingSettings`` is kept as a name for readability at call sites; it is the one settings class.
"""

from __future__ import annotations

from shared.settings import Settings

ServingSettings = Settings


def serving_settings(settings: Settings | dict | None = None) -> Settings:
    """Settings from an instance, a dump of one, or the environment."""
    if settings is None:
        return Settings()
    if isinstance(settings, Settings):
        return settings
    return Settings(**dict(settings))
