"""mkdt: dataset distillation for self-supervised pre-training (MKDT, ICLR 2025)."""

__version__ = "0.1.0"
