"""The one exception type the CLI turns into a clean one-line message."""


class FastVAEError(Exception):
    """A problem with the user's input (data, checkpoint, options), not a bug in fastvae."""
