"""Hugging Face models: their own ``labels=`` loss computed per example."""

from swiftdp.hf.labels import ModelLoss, is_hf_model

__all__ = ["ModelLoss", "is_hf_model"]
