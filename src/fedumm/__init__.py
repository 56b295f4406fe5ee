"""fedumm: federated fine-tuning of unified multimodal models with LoRA adapters."""

__version__ = "0.1.0"
