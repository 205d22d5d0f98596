"""The error `router_core` raises for files and packages it cannot use (its own module, so the
loaders in `artifacts` and `complexity` share it without importing each other)."""


class ArtifactError(ValueError):
    """A routing artifact is missing, malformed, or does not fit what it is loaded against."""
