"""Moved to squeeze/formats/packed.py (squeeze's own packed format, now the fallback); names kept for callers."""

from squeeze.formats.packed import (  # noqa: F401
    FORMAT, PACKED_FILE, VERSION, is_packed, load_packed, pack_int4, read_packed, save_packed, unpack_int4,
)
