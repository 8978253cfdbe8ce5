"""hybrid: run Kimi K2 / DeepSeek-V3 with attention on the device and routed experts in host RAM.

    >>> import hybrid
    >>> eng = hybrid.load("path/to/model", device="cpu")
    >>> eng.generate([1, 2, 3], max_new_tokens=8)
"""
from .config import ConfigError, ModelConfig
from .engine import Engine
from .loader import load

__all__ = ["load", "Engine", "ModelConfig", "ConfigError"]
__version__ = "0.1.0"
