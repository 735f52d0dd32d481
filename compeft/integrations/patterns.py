"""Regular expressions from untrusted files, evaluated in bounded time.

PEFT matches strings of an adapter config (``target_modules``, ``exclude_modules``, the keys of
``rank_pattern``, ...) as Python regular expressions against every module name of a model, with
the backtracking ``re`` engine: ``(a|a)*b`` or ``(.*)*x`` take time exponential in the name, and
the config comes from a downloaded file. Here a pattern is compiled to a Thompson NFA and run as a
lazily built DFA: time linear in the name for a given pattern, and every call charges a
:class:`Budget` that stops the whole evaluation of a config after a fixed amount of work.

The syntax is Python's (literals, escapes, ``.``, classes, groups, alternation, ``* + ? {m,n}``
greedy or lazy, ``^ $ \\A \\Z``); what needs backtracking or context (back-references,
look-around, ``\\b``, possessive repeats, inline flags, conditionals) and patterns over the size
limits are refused with :class:`PatternError`. Results agree with ``re.fullmatch`` / ``re.match``
(``tests/test_adapter_config.py`` compares them on random patterns).
"""

from __future__ import annotations

import re
from typing import Iterable

MAX_PATTERN = 4096  # characters of one pattern
MAX_STATES = 20_000  # NFA states of one pattern (counted repeats are unrolled)
MAX_CACHE = 20_000  # DFA transitions kept per pattern before the cache starts again
DEFAULT_BUDGET = 5_000_000  # units of work (a character step, or a state visited building one)
MAX_GROUP_DEPTH = 64  # groups nested in a pattern
MAX_NESTING = 32  # groups nested in a regular expression built by literal_union

_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)
_AT_START, _AT_END, _BEFORE_FINAL_NEWLINE = 1, 2, 4
_ASSERTIONS = {"^": _AT_START, "A": _AT_START, "$": _AT_END | _BEFORE_FINAL_NEWLINE, "Z": _AT_END}
_CONTROL = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}
_CATEGORIES = "dDwWsS"


class PatternError(ValueError):
    """A pattern that is not valid, uses a feature evaluated here only by backtracking, is too
    large, or took more than its budget of work."""


class Budget:
    """Units of work left for one evaluation (one adapter config); :meth:`charge` raises
    :class:`PatternError` when they run out."""

    def __init__(self, units: int = DEFAULT_BUDGET) -> None:
        self.left = units

    def charge(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise PatternError("evaluating the patterns took more work than allowed")


class CharSet:
    """What one position of a pattern accepts: ranges of code points and ``\\d \\w \\s`` categories
    (Unicode, as ``re``), possibly negated; ``dot`` is ``.`` (anything but a newline)."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = (), categories: str = "", negate: bool = False,
                 dot: bool = False) -> None:
        self.ranges, self.categories, self.negate, self.dot = list(ranges), categories, negate, dot

    def __contains__(self, ch: str) -> bool:
        if self.dot:
            return ch != "\n"
        code = ord(ch)
        found = any(lo <= code <= hi for lo, hi in self.ranges) or any(_in_category(ch, c) for c in self.categories)
        return found != self.negate


def _in_category(ch: str, category: str) -> bool:
    lower = category.lower()
    found = ch.isdecimal() if lower == "d" else (ch.isalnum() or ch == "_") if lower == "w" else ch.isspace()
    return found if category.islower() else not found


class _Parser:
    """Python's regular expression syntax (the subset above) into a tree of tuples:
    ("char", CharSet), ("cat", [..]), ("alt", [..]), ("rep", node, lo, hi or None), ("assert", bits)."""

    def __init__(self, text: str) -> None:
        self.text, self.i, self.depth = text, 0, 0

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def take(self) -> str:
        ch = self.peek()
        self.i += 1
        return ch

    def unsupported(self, what: str) -> PatternError:
        return PatternError(f"{what} (at position {self.i}) is not evaluated here")

    def parse(self) -> tuple:
        node = self.alternation()
        if self.i != len(self.text):
            raise PatternError(f"unbalanced parenthesis at position {self.i}")
        return node

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.take()
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self) -> tuple:
        items = []
        while self.peek() not in ("", "|", ")"):
            atom = self.atom()
            while True:
                bounds = self.quantifier()
                if bounds is None:
                    break
                if self.peek() == "?":
                    self.take()  # lazy: the same set of matches
                elif self.peek() == "+":
                    raise self.unsupported("a possessive repeat")
                atom = ("rep", atom, *bounds)
            items.append(atom)
        return items[0] if len(items) == 1 else ("cat", items)

    def quantifier(self) -> tuple[int, int | None] | None:
        ch = self.peek()
        if ch in ("*", "+", "?"):
            self.take()
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
        if ch != "{":
            return None
        found = re.compile(r"\{(\d*)(?:(,)(\d*))?\}").match(self.text, self.i)
        if found is None or found.group(0) == "{}":
            return None  # a literal "{", as in re
        self.i = found.end()
        lo = int(found.group(1) or 0)
        hi = (int(found.group(3)) if found.group(3) else None) if found.group(2) else lo
        if max(lo, hi or 0) > MAX_STATES:
            raise PatternError(f"a repeat count above {MAX_STATES}")
        return lo, hi

    def atom(self) -> tuple:
        ch = self.take()
        if ch == "(":
            self.depth += 1
            if self.depth > MAX_GROUP_DEPTH:
                raise PatternError(f"groups nested more than {MAX_GROUP_DEPTH} deep")
            if self.peek() == "?":
                self.take()
                if self.peek() == ":":
                    self.take()
                elif self.text.startswith("P<", self.i):
                    end = self.text.find(">", self.i)
                    if end < 0:
                        raise PatternError("an unterminated group name")
                    self.i = end + 1
                else:
                    raise self.unsupported("a '(?' group other than (?:...) and (?P<name>...)")
            node = self.alternation()
            if self.take() != ")":
                raise PatternError("missing ), unterminated subpattern")
            self.depth -= 1
            return node
        if ch == "[":
            return ("char", self.char_class())
        if ch == ".":
            return ("char", CharSet(dot=True))
        if ch in ("^", "$"):
            return ("assert", _ASSERTIONS[ch])
        if ch == "\\":
            return self.escape(in_class=False)
        if ch in ("*", "+", "?", ")", ""):
            raise PatternError(f"nothing to repeat at position {self.i - 1}")
        return ("char", CharSet([(ord(ch), ord(ch))]))

    def escape(self, in_class: bool) -> tuple:
        """The escape after a backslash: ("char", CharSet) or ("assert", bits)."""
        ch = self.take()
        if not ch:
            raise PatternError("a bad escape at the end of the pattern")
        if ch in _CATEGORIES:
            return ("char", CharSet(categories=ch))
        if ch in ("A", "Z") and not in_class:
            return ("assert", _ASSERTIONS[ch])
        if ch in _CONTROL or (ch == "b" and in_class):
            code = ord(_CONTROL.get(ch, "\b"))
        elif ch in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[ch]
            digits = self.text[self.i:self.i + width]
            if len(digits) != width or not re.fullmatch(r"[0-9a-fA-F]+", digits):
                raise PatternError(f"a bad \\{ch} escape at position {self.i}")
            self.i += width
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise PatternError(f"a bad \\{ch} escape at position {self.i}")
        elif ch.isascii() and ch.isalnum():
            raise self.unsupported(f"the escape \\{ch}")
        else:
            code = ord(ch)
        return ("char", CharSet([(code, code)]))

    def char_class(self) -> CharSet:
        negate = self.peek() == "^"
        if negate:
            self.take()
        ranges: list[tuple[int, int]] = []
        categories = ""
        first = True
        while True:
            ch = self.take()
            if not ch:
                raise PatternError("an unterminated character set")
            if ch == "]" and not first:
                return CharSet(ranges, categories, negate)
            first = False
            if ch == "\\":
                single = self.escape(in_class=True)[1]
                if single.categories:
                    categories += single.categories
                    continue
                lo = single.ranges[0][0]
            else:
                lo = ord(ch)
            if self.peek() == "-" and self.text[self.i + 1:self.i + 2] not in ("]", ""):
                self.take()
                end = self.take()
                hi = self.escape(in_class=True)[1] if end == "\\" else CharSet([(ord(end), ord(end))])
                if hi.categories or hi.ranges[0][0] < lo:
                    raise PatternError(f"a bad character range at position {self.i}")
                ranges.append((lo, hi.ranges[0][0]))
            else:
                ranges.append((lo, lo))


class Pattern:
    """A compiled pattern: :meth:`fullmatch` and :meth:`match` as ``re``'s, in bounded time."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise PatternError("a pattern must be a string")
        if len(text) > MAX_PATTERN:
            raise PatternError(f"a pattern is longer than {MAX_PATTERN} characters")
        try:
            re.compile(text)  # the same errors as PEFT would meet; compiling does not run the pattern
        except (re.error, RecursionError, OverflowError) as exc:
            raise PatternError(f"not a valid regular expression ({exc})") from None
        self.text = text
        self.kind: list[int] = []
        self.arg: list[object] = []  # CharSet, assertion bits, or the second branch of a split
        self.out: list[int] = []
        match = self._state(_MATCH, None, -1)
        self.start = self._emit(_Parser(text).parse(), match)
        self._cache: dict[tuple[frozenset[int], str, int], frozenset[int]] = {}
        self._match = match

    def _state(self, kind: int, arg: object, out: int) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternError(f"a pattern needs more than {MAX_STATES} states")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    def _emit(self, node: tuple, nxt: int) -> int:
        """The state that matches ``node`` and continues at ``nxt``."""
        tag = node[0]
        if tag == "char":
            return self._state(_CHAR, node[1], nxt)
        if tag == "assert":
            return self._state(_ASSERT, node[1], nxt)
        if tag == "cat":
            for item in reversed(node[1]):
                nxt = self._emit(item, nxt)
            return nxt
        if tag == "alt":
            starts = [self._emit(branch, nxt) for branch in node[1]]
            state = starts[-1]
            for branch in reversed(starts[:-1]):
                state = self._state(_SPLIT, state, branch)
            return state
        _, body, lo, hi = node
        if hi is None:  # lo copies, then a loop
            loop = self._state(_SPLIT, nxt, -1)
            self.out[loop] = self._emit(body, loop)
            state = loop
        else:
            if hi < lo:
                raise PatternError("min repeat greater than max repeat")
            state = nxt
            for _ in range(hi - lo):
                state = self._state(_SPLIT, nxt, self._emit(body, state))
        for _ in range(lo):
            state = self._emit(body, state)
        return state

    def _closure(self, states: Iterable[int], context: int, budget: Budget) -> frozenset[int]:
        """The character and match states reachable from ``states`` without consuming a character."""
        seen: set[int] = set()
        found = []
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self.kind[s]
            if kind == _SPLIT:
                stack.append(self.arg[s])  # type: ignore[arg-type]
                stack.append(self.out[s])
            elif kind == _ASSERT:
                if self.arg[s] & context:  # type: ignore[operator]
                    stack.append(self.out[s])
            else:
                found.append(s)
        budget.charge(len(seen) + 1)
        return frozenset(found)

    def _run(self, text: str, full: bool, budget: Budget) -> bool:
        if not isinstance(text, str):
            return False
        n = len(text)

        def context(pos: int) -> int:
            return ((_AT_START if pos == 0 else 0) | (_AT_END if pos == n else 0)
                    | (_BEFORE_FINAL_NEWLINE if pos == n - 1 and text[pos] == "\n" else 0))

        current = self._closure([self.start], context(0), budget)
        for pos, ch in enumerate(text):
            if not full and self._match in current:
                return True
            budget.charge(1)
            key = (current, ch, context(pos + 1))
            following = self._cache.get(key)
            if following is None:
                budget.charge(len(current))
                moved = [self.out[s] for s in current
                         if self.kind[s] == _CHAR and ch in self.arg[s]]  # type: ignore[operator]
                following = self._closure(moved, key[2], budget)
                if len(self._cache) >= MAX_CACHE:
                    self._cache.clear()
                self._cache[key] = following
            current = following
            if not current:
                return False
        return self._match in current

    def fullmatch(self, text: str, budget: Budget) -> bool:
        """Whether ``re.fullmatch(pattern, text)`` matches."""
        return self._run(text, True, budget)

    def match(self, text: str, budget: Budget) -> bool:
        """Whether ``re.match(pattern, text)`` matches (anchored at the start only)."""
        return self._run(text, False, budget)


def literal_union(names: Iterable[str]) -> str:
    """A regular expression that ``re.fullmatch`` matches against exactly the strings ``names``,
    shaped as a trie over their dot-separated parts (so ``re`` never backtracks far) and nested at
    most :data:`MAX_NESTING` groups deep. Matches nothing (``(?!)``) when ``names`` is empty."""
    root: dict = {}
    for name in names:
        node = root
        for part in name.split("."):
            node = node.setdefault(part, {})
        node[None] = {}
    return _alternatives(root, 0) if root else "(?!)"


def _alternatives(node: dict, depth: int) -> str:
    """A regex for the strings below ``node`` (which has at least one part)."""
    if depth >= MAX_NESTING:  # deeper: a flat alternation of the remaining strings
        flat = sorted(_strings(node))
        return "(?:" + "|".join(re.escape(s) for s in flat) + ")"
    branches = []
    for part in sorted(k for k in node if k is not None):
        child = node[part]
        deeper = [k for k in child if k is not None]
        tail = r"\." + _alternatives(child, depth + 1) if deeper else ""
        if tail and None in child:
            tail = f"(?:{tail})?"
        branches.append(re.escape(part) + tail)
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


def _strings(node: dict) -> list[str]:
    """The dotted strings below ``node`` (iteratively: no recursion on deep tries)."""
    out = []
    stack = [(node, None)]
    while stack:
        current, prefix = stack.pop()
        for part, child in current.items():
            if part is None:
                continue
            text = part if prefix is None else f"{prefix}.{part}"
            if None in child:
                out.append(text)
            stack.append((child, text))
    return out
