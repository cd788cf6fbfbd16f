"""User-facing errors: one line that names the problem and the fix."""


class SqueezeError(Exception):
    """An error caused by input or environment, reported as one clear line (no traceback)."""
