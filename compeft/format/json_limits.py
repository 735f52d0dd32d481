"""The one JSON reader of the untrusted documents compeft opens: container headers (spec/FORMAT.md 3)
and library catalogs (spec/LIBRARY.md 3.3), each with its own :class:`JsonLimits`.

Pure standard library. Memory stays bounded by checking the document's size and its count of
objects and arrays before parsing, numbers while parsing (a hook aborts on the first bad one), and
nesting and strings right after, so that a document breaking a rule costs no more than a legitimate
one of its size. The rules, in the order they are checked (every one raises :class:`JsonRuleError`):

1. at most ``max_bytes`` bytes;
2. at most ``max_containers`` objects and arrays (brackets inside strings do not count) and, where the
   limits set ``max_values``, at most that many values (every string, number, literal, object and
   array counts one; object keys do not), both counted before parsing;
3. UTF-8 (no byte order mark, no encoded surrogates) and one JSON value (RFC 8259), surrounded by
   JSON whitespace only;
4. no object holds the same key twice; no ``NaN``, ``Infinity`` or ``-Infinity``; every number
   rounds to a finite IEEE-754 double (so ``1e999`` and a 400-digit integer are refused); the
   number ``-0`` is negative zero, read as the float ``-0.0`` (not the integer 0);
5. at most ``max_depth`` levels of objects and arrays, the outermost one being level 1;
6. no string (object keys included) holds a lone surrogate (``"\\ud800"``): every string is Unicode
   text that UTF-8 can encode.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 64
# An integer of more digits than this is at least 10**309, beyond the largest double (~1.8e308);
# one of fewer is below 10**308, within it (only integers of exactly 309 digits need a conversion).
_MAX_INTEGER_DIGITS = 309


@dataclass(frozen=True)
class JsonLimits:
    """The limits of one kind of document (rules 1, 2 and 5 of the module docstring). Parsing costs
    ~60 bytes per object or array and 30-70 per scalar value, so these bound its memory."""

    max_bytes: int
    max_containers: int
    max_depth: int = MAX_DEPTH
    max_values: int | None = None  # None: the byte limit is bound enough (a 64 MiB header)


class JsonRuleError(ValueError):
    """A document breaks one of the JSON rules; the message names the rule (callers add the document
    and the file: ``HeaderError(f"header JSON: {exc}", path)``)."""


class _BadNumber(ValueError):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# A JSON string; the closing quote is optional so that the pattern never fails once it starts: a
# failing match would be retried at the next quote, which is quadratic on '"\"\"\"…' (a hang). The
# "unrolled" form ([^"\\]* between escapes) is linear too and about three times faster.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# Integers need a parse hook only when one may be -0 or have more digits than a double can hold:
# rare, and the hook costs ~40 % of the parse of a header of many tensors, so the text is screened.
_MINUS_ZERO = re.compile(rb"-0[ \t\n\r]*[,\]}]")
_DIGITS_ONLY = bytes(0x39 if 0x30 <= c <= 0x39 else 0x20 for c in range(256))  # digits -> "9", else " "
# An empty object or array once strings are replaced by a placeholder (so '[""]' is not empty).
_EMPTY_CONTAINER = re.compile(rb"[\[{][ \t\n\r]*[\]}]")
# A \u escape of a UTF-16 surrogate (D800-DFFF): the only way a JSON text can spell a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# The key a number follows, for error messages: '"scale":' just before it.
_KEY_BEFORE = re.compile(rb'"((?:[^"\\]|\\.){1,80})"\s*:\s*$')


def check_counts(text: bytes, limits: JsonLimits) -> None:
    """Rule 2 on the text, before parsing: objects and arrays outside strings and, when limited,
    values (1 + commas + non-empty containers, for a well-formed text). The strings are only skipped
    when the cheap bounds (counting inside strings too) exceed a limit."""
    containers = text.count(b"{") + text.count(b"[")
    too_many_values = limits.max_values is not None and text.count(b",") + containers + 1 > limits.max_values
    if containers <= limits.max_containers and not too_many_values:
        return
    bare = _JSON_STRING.sub(b"0", text)  # every string becomes one placeholder value
    containers = bare.count(b"{") + bare.count(b"[")
    if containers > limits.max_containers:
        raise JsonRuleError(f"more than {limits.max_containers} JSON objects and arrays")
    if limits.max_values is not None:
        values = 1 + bare.count(b",") + containers - len(_EMPTY_CONTAINER.findall(bare))
        if values > limits.max_values:
            raise JsonRuleError(f"more than {limits.max_values} JSON values")


def _reject_constant(token: str) -> None:
    raise JsonRuleError(f"{token} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers of one document must not see different values: JSON parsers disagree on which of
    # two equal keys wins, so a document holding both is rejected instead of guessed.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise JsonRuleError(f"duplicate key {twice[:80]!r}")
    return doc


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(text)
    return value


def _integer(text: str) -> int | float:
    if text == "-0":  # negative zero: a double, not the integer 0 (it must not pass as a count or a +0 scale)
        return -0.0
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS:  # (checked before int(): no quadratic conversion)
        raise _BadNumber(text)
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _BadNumber(text) from None
    return value


def _integer_hook(text: bytes) -> Any:
    """:func:`_integer` when an integer token of ``text`` may be ``-0`` or too long, else None (the
    default ``int``): exact either way, since every other integer token fits a double."""
    if _MINUS_ZERO.search(text) or b"9" * _MAX_INTEGER_DIGITS in text.translate(_DIGITS_ONLY):
        return _integer
    return None


def _depth(doc: Any, limit: int) -> int:
    """Levels of objects and arrays in ``doc`` (a scalar: 0), counting at most to ``limit + 1``."""
    level = [doc] if isinstance(doc, (dict, list)) else []
    depth = 0
    while level and depth <= limit:
        depth += 1
        level = [child for value in level for child in (value.values() if isinstance(value, dict) else value)
                 if isinstance(child, (dict, list))]
    return depth


def _lone_surrogate(doc: Any) -> str | None:
    """The first string (key or value) of ``doc`` that UTF-8 cannot encode, or None."""
    stack = [doc]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return value
    return None


def _number_context(text: bytes, number: str) -> str:
    """' (after "key")' for the first occurrence of ``number`` in ``text``, for error messages."""
    at = text.find(number.encode())
    found = _KEY_BEFORE.search(text[max(0, at - 120):at]) if at >= 0 else None
    return f' (after "{found.group(1).decode("utf-8", "replace")}")' if found else ""


def loads(text: bytes, limits: JsonLimits) -> Any:
    """Parse ``text`` under every rule of the module docstring, or raise :class:`JsonRuleError`."""
    if len(text) > limits.max_bytes:
        raise JsonRuleError(f"larger than the limit of {limits.max_bytes} bytes")
    check_counts(text, limits)
    try:
        doc = json.loads(text.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys,
                         parse_float=_float, parse_int=_integer_hook(text))
    except _BadNumber as exc:
        shown = exc.text if len(exc.text) <= 40 else f"{exc.text[:20]}…({len(exc.text)} characters)"
        raise JsonRuleError(f"the number {shown}{_number_context(text, exc.text)} overflows a double") from None
    except JsonRuleError:
        raise
    except RecursionError:
        raise JsonRuleError(f"nesting deeper than {limits.max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # (json.JSONDecodeError is a ValueError)
        raise JsonRuleError(f"not valid UTF-8 JSON ({exc})") from None
    if _depth(doc, limits.max_depth) > limits.max_depth:
        raise JsonRuleError(f"nesting deeper than {limits.max_depth} levels")
    if _SURROGATE_ESCAPE.search(text):  # (rare: only then can a string hold a lone surrogate)
        bad = _lone_surrogate(doc)
        if bad is not None:
            raise JsonRuleError(f"the string {ascii(bad)[:80]} holds a lone surrogate (it is not Unicode text)")
    return doc
