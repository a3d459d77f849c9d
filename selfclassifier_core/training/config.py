"""Training configuration: the modes and their choice lists (one config dataclass per mode)."""
from __future__ import annotations

MODES = ("scratch", "fast", "finetune")
RESUMABLE_MODES = ("scratch", "finetune")  # fast runs start again from their feature cache
OPTIMIZERS = ("lars", "adamw")
AUGMENTS = ("auto", "cpu", "device")
