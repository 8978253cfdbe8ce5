"""hybrid: run Kimi K2 / DeepSeek-V3 with attention on the device and routed experts in host RAM.

    >>> import hybrid
    >>> eng = hybrid.load("path/to/model", device="cpu")
    >>> eng.generate([1, 2, 3], max_new_tokens=8)

Subpackages, lower never importing higher (tests/test_layout.py keeps it so):
    core < text < models < runtime < profile < plan < serve < cli
The names below are imported on first use, so `import hybrid.core.policies` does not pull in torch.
"""
from __future__ import annotations

__all__ = ["load", "Engine", "ModelConfig", "ConfigError"]
__version__ = "0.1.0"

_LAZY = {"load": "hybrid.runtime.loader", "Engine": "hybrid.runtime.engine",
         "ModelConfig": "hybrid.core.config", "ConfigError": "hybrid.core.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hybrid' has no attribute {name!r}")
