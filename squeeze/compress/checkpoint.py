"""Moved to squeeze/formats (saving and loading sit below the compressors); these names stay for callers."""

from squeeze.formats import load, save  # noqa: F401
from squeeze.formats.sparse import (  # noqa: F401
    BITMASK, MIN_SPARSITY, SPARSE_FILE, VALUES, decode, encode, nonzero_entries, pack_bits, read_sparse,
    stored_sparse, unpack_bits,
)
