"""Turn a model URI into a local file or folder the runtime can open (or a file in memory the instances share)."""

from .archives import ArchiveLimits, is_archive, unpack
from .cache import cache_dir
from .errors import ArtifactError, ArtifactMissing
from .memory import InMemoryArtifact, Materialized, fetch_into_memory, materialize, shared_in_memory
from .remote import is_remote
from .resolve import resolve_model

__all__ = [
    "ArchiveLimits",
    "ArtifactError",
    "ArtifactMissing",
    "InMemoryArtifact",
    "Materialized",
    "cache_dir",
    "fetch_into_memory",
    "is_archive",
    "is_remote",
    "materialize",
    "resolve_model",
    "shared_in_memory",
    "unpack",
]
