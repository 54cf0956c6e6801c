"""Model loading and the memory/reason control-token scheme."""

from memreason.model.loading import DEFAULT_MODEL, cache_dir, load

__all__ = ["DEFAULT_MODEL", "cache_dir", "load"]
