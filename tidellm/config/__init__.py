"""Engine configuration: one small dataclass per domain, gathered in :class:`EngineConfig`.

Every field carries a ``help`` string in its metadata; the CLI builds its flags from these fields, so a
setting is declared once. Validation errors name the value and the fix.
"""

from tidellm.config.engine import (
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    LoadConfig,
    ModelConfig,
    SchedulerConfig,
)

__all__ = ["CacheConfig", "DeviceConfig", "EngineConfig", "LoadConfig", "ModelConfig", "SchedulerConfig"]
