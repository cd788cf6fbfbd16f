"""A small, strict reader for R lazy-load databases (``Rdata.rdx`` + ``Rdata.rdb``).

Only what R packages use to ship plain data is supported: XDR serialization
(format versions 2 and 3) of character, integer, logical and double vectors,
lists and pairlists with symbol tags.  Anything else raises ``RDataError``
rather than being guessed at.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

from squeeze.errors import SqueezeError

# SEXP type codes (R Internals, "Serialization Formats").
_SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP = 1, 2, 9, 10, 13, 14, 16, 19
_REFSXP, _NILVALUE_SXP = 255, 254
_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10
# Encoding bits of a CHARSXP's "levels" (flags >> 12).
_LATIN1, _UTF8, _ASCII = 1 << 2, 1 << 3, 1 << 6
_NA_INTEGER = -(2**31)


class RDataError(SqueezeError):
    """The bytes are not an R object this reader understands."""


class _Reader:
    def __init__(self, data: bytes, source: str):
        self.data = data
        self.pos = 0
        self.source = source
        self.refs: list[str] = []
        self.native_encoding = "utf-8"

    def fail(self, what: str) -> RDataError:
        return RDataError(f"{self.source}: {what} at byte {self.pos}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated data (wanted {n} bytes)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            upper, lower = struct.unpack(">II", self.take(8))
            n = (upper << 32) | lower
        if n < 0:
            raise self.fail(f"negative length {n}")
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise self.fail("not XDR-serialized R data (expected header 'X\\n')")
        version = self.int()
        self.int()  # version of R that wrote it
        self.int()  # minimal R version that can read it
        if version == 3:
            self.native_encoding = self.take(self.int()).decode("ascii")
        elif version != 2:
            raise self.fail(f"unsupported serialization format version {version}")

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        if kind == _NILVALUE_SXP:
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise self.fail(f"reference {index} to an unknown object")
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            if not isinstance(name, str):
                raise self.fail("symbol without a name")
            self.refs.append(name)
            return name
        if kind == _CHARSXP:
            return self.charsxp(flags)
        if kind == _LISTSXP:
            return self.pairlist(flags)
        if kind not in (_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP):
            raise self.fail(f"unsupported R object type {kind}")
        n = self.length()
        if kind == _STRSXP:
            value = [self.item() for _ in range(n)]
            if not all(v is None or isinstance(v, str) for v in value):
                raise self.fail("character vector holding a non-string element")
        elif kind == _VECSXP:
            value = [self.item() for _ in range(n)]
        elif kind == _REALSXP:
            value = [None if math.isnan(x) else x for x in struct.unpack(f">{n}d", self.take(8 * n))]
        else:
            ints = struct.unpack(f">{n}i", self.take(4 * n))
            cast = bool if kind == _LGLSXP else int
            value = [None if x == _NA_INTEGER else cast(x) for x in ints]
        if flags & _HAS_ATTR:
            attributes = self.item()
            if not isinstance(attributes, dict):
                raise self.fail("malformed attribute list")
            names = attributes.get("names")
            # A named list becomes a dict; other attributes (classes, row names) are not needed.
            if kind == _VECSXP and names is not None:
                if len(names) != n or None in names:
                    raise self.fail("list names do not match its elements")
                return dict(zip(names, value))
        return value

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.take(n)
        levels = flags >> 12
        if levels & _LATIN1:
            encoding = "latin-1"
        elif levels & (_UTF8 | _ASCII):
            encoding = "utf-8"
        else:
            encoding = self.native_encoding
        try:
            return raw.decode(encoding)
        except (UnicodeDecodeError, LookupError) as exc:
            raise self.fail(f"cannot decode string as {encoding}: {exc}") from None

    def pairlist(self, flags: int) -> dict:
        # A tagged pairlist (attributes, named arguments) as a dict; read iteratively
        out: dict = {}
        while True:
            if flags & _HAS_ATTR:
                self.item()  # attributes on a pairlist cell are never needed here
            if not flags & _HAS_TAG:
                raise self.fail("pairlist element without a tag")
            tag = self.item()
            if not isinstance(tag, str):
                raise self.fail("pairlist tag is not a symbol")
            out[tag] = self.item()
            flags = self.int()
            if flags & 0xFF == _NILVALUE_SXP:
                return out
            if flags & 0xFF != _LISTSXP:
                raise self.fail(f"pairlist continues with type {flags & 0xFF}")


def unserialize(data: bytes, source: str = "R data"):
    """Decode one XDR-serialized R object (as written by ``serialize``/``saveRDS``).

    Returns: character/integer/logical/double vectors as lists (NA as ``None``),
    named lists and pairlists as dicts, unnamed lists as lists.
    """
    reader = _Reader(data, source)
    reader.header()
    value = reader.item()
    if reader.pos != len(data):
        raise reader.fail(f"{len(data) - reader.pos} unexpected trailing bytes")
    return value


def read_rds(path: Path):
    """Read an ``.rds``-style file: a gzip- or uncompressed XDR-serialized object."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return unserialize(data, str(path))


def read_lazyload_db(rdx: Path, rdb: Path) -> dict:
    """All variables of an R lazy-load database, as ``{name: value}``.

    The ``.rdx`` index maps each variable to (offset, length) in the ``.rdb``
    file; each record there is a 4-byte big-endian uncompressed length
    followed by a zlib stream of one serialized object.
    """
    index = read_rds(rdx)
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{rdx}: not a lazy-load index (no 'variables' list)")
    if index.get("compressed") not in ([True], [1]):
        raise RDataError(f"{rdx}: only zlib-compressed databases are supported, got {index.get('compressed')}")
    blob = Path(rdb).read_bytes()
    out = {}
    for name, entry in index["variables"].items():
        if not (isinstance(entry, list) and len(entry) == 2 and None not in entry):
            raise RDataError(f"{rdx}: bad index entry for {name!r}")
        offset, length = entry
        record = blob[offset : offset + length]
        if length < 4 or len(record) != length:
            raise RDataError(f"{rdb}: record {name!r} lies outside the file")
        expected = struct.unpack(">I", record[:4])[0]
        try:
            data = zlib.decompress(record[4:])
        except zlib.error as exc:
            raise RDataError(f"{rdb}: record {name!r} is not a zlib stream: {exc}") from None
        if len(data) != expected:
            raise RDataError(f"{rdb}: record {name!r} is {len(data)} bytes, header says {expected}")
        out[name] = unserialize(data, f"{rdb}:{name}")
    return out
