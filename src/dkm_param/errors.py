"""The library's own exceptions, so callers can catch dkm_param failures."""


class DKMError(Exception):
    """Base class of every error dkm_param raises on purpose."""


class SpecError(DKMError, ValueError):
    """A LayerSpec or Policy value is out of range or does not fit a layer."""


class RegistrationError(DKMError, ValueError):
    """A model cannot be registered, finalized or loaded as asked."""


class FormatError(DKMError, ValueError):
    """A compressed file is malformed, truncated or of an unknown version."""


class SurgeryError(DKMError, ValueError):
    """A model cannot be traced or thinned as asked."""


class ClusteringError(DKMError, ValueError):
    """k-means could not cluster a layer as asked (e.g. clusters stayed empty)."""


class ExportError(DKMError, ValueError):
    """A model cannot be handed to a runtime (Core ML, torch.export) as asked."""
