"""The errors every resolver raises."""


class ArtifactError(ValueError):
    """The model URI cannot be resolved; the message says why and what would work."""


class ArtifactMissing(ArtifactError):
    """Nothing is at the URI (no file, no object, a 404): a multi-model endpoint answers the caller 404."""
