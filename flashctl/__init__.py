"""flashctl: few-step distillation experiments for Qwen-Image text-to-image + editing models."""

__version__ = "0.1.0"
