"""The one error a bad checkpoint raises, so callers catch a single type."""


class CheckpointError(ValueError):
    """A checkpoint folder is missing, inconsistent or mis-shaped; the message names what."""
