"""Turn a model URI into a local file the runtime can open."""

from .resolve import ArtifactError, cache_dir, resolve_model

__all__ = ["ArtifactError", "cache_dir", "resolve_model"]
