"""memreason: make an LLM's knowledge recall and its reasoning separate, visible and repairable."""

__version__ = "0.1.0"
