"""lora-tools: streaming, exact tools for LoRA adapters and checkpoints.

Importing this package does not import torch, so that ``lora-tools --help`` stays fast.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
