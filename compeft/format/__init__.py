"""The compeft container, version 1: the only package that knows the byte layout (spec/FORMAT.md)."""

from .header import (COMPRESSIBLE_DTYPES, DTYPE_SIZES, ENCODING_DENSE, ENCODING_GOLOMB, FORMAT_VERSION, MAGIC,
                     Header, TensorEntry, encode_header)
from .io import BytesReader, FileReader, RangeReader, atomic_write, check_crc, check_payload, read_header

__all__ = [
    "COMPRESSIBLE_DTYPES", "DTYPE_SIZES", "ENCODING_DENSE", "ENCODING_GOLOMB", "FORMAT_VERSION", "MAGIC",
    "Header", "TensorEntry", "encode_header", "BytesReader", "FileReader", "RangeReader", "atomic_write",
    "check_crc", "check_payload", "read_header",
]
