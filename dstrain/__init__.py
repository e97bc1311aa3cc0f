"""dstrain: fine-tune GenSLM genome language models with DeepSpeed ZeRO.

Importing this package is cheap: torch, transformers and deepspeed are only imported by
the modules that need them (model, data, train loop).
"""

__version__ = "0.1.0"
