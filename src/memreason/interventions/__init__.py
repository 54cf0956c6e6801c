"""Inference-time interventions on causal LMs, built on scoped PyTorch hooks (nothing in transformers is patched)."""

from memreason.interventions.memory_injection import inject, memory_vector

__all__ = ["inject", "memory_vector"]
