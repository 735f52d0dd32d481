"""The compeft container, versions 1 and 2: the only package that knows the byte layout (spec/FORMAT.md)."""

from .header import (COMPRESSIBLE_DTYPES, DTYPE_SIZES, ENCODING_DENSE, ENCODING_GOLOMB, ENCODING_PACKED,
                     FORMAT_VERSION, FORMAT_VERSIONS, MAGIC, Header, TensorEntry, encode_header, payload_alignment)
from .io import BytesReader, FileReader, RangeReader, atomic_write, check_crc, check_payload, read_header

__all__ = [
    "COMPRESSIBLE_DTYPES", "DTYPE_SIZES", "ENCODING_DENSE", "ENCODING_GOLOMB", "ENCODING_PACKED", "FORMAT_VERSION",
    "FORMAT_VERSIONS", "MAGIC", "Header", "TensorEntry", "encode_header", "payload_alignment", "BytesReader", "FileReader", "RangeReader", "atomic_write",
    "check_crc", "check_payload", "read_header",
]
