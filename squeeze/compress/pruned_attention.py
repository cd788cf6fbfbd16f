"""Moved to squeeze.arch.pruned_attention; this name stays until squeeze/compress/checkpoint.py imports it
from there (nothing else should)."""

from squeeze.arch.pruned_attention import LAYOUT, TWINS  # noqa: F401
