"""An expert's ``adapter_config`` checked before PEFT sees it.

The config comes from the expert's header, that is from a downloaded file, and PEFT trusts it:
it matches ``target_modules`` / ``exclude_modules`` / ``feedforward_modules`` (when strings) and
the keys of ``rank_pattern`` / ``alpha_pattern`` as regular expressions against every module name,
inserts ``modules_to_save`` and ``layers_pattern`` entries into regular expressions of its own, and
reads every field without checking its type. :func:`checked_config` returns a copy that PEFT can
read in bounded time and without a ``TypeError`` or ``AttributeError``:

* every field of the config class PEFT would build is checked against that class's annotations
  (or must equal its default); fields PEFT does not know are dropped, as PEFT itself drops them;
* a pattern is handed on unchanged only when it is a plain name (letters, digits, ``_ . -``: linear
  under every regular expression PEFT wraps it in); any other pattern is evaluated here, by
  :mod:`compeft.integrations.patterns` within a work budget, against the module names the adapter
  will meet, and replaced by a regular expression matching exactly the names it matched (a trie of
  literals, which ``re`` matches without backtracking);
* names PEFT inserts into its own expressions (``modules_to_save``, ``layers_pattern``) must be plain;
* lists and mappings hold at most :data:`MAX_ITEMS` entries (PEFT compares every module name with
  every entry), ranks are at most the largest dimension of the expert's tensors (PEFT allocates
  rank × width per module), and configs that make PEFT read other files or fetch from the network
  are refused.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import functools
import re
import types
import typing
from typing import Any, Iterable, Literal, Sequence, Union

from ..errors import SourceError
from .patterns import Budget, Pattern, PatternError, literal_union

MAX_ITEMS = 1024  # entries of a list or mapping in the config
MAX_INT = 2 ** 53
MAX_TEXT = 65536  # characters of one string in the config
MAX_DEPTH = 64  # nesting of lists and objects (the header's own limit, FORMAT.md 8)
# A pattern with only these characters is linear under every regular expression PEFT builds around it.
PLAIN = re.compile(r"[A-Za-z0-9_.\-]{1,256}")
# str: re.fullmatch(pattern, module name); list: names, matched exactly or as a dotted suffix.
SELECTORS = ("target_modules", "exclude_modules", "feedforward_modules")
# entries written into PEFT's own expressions, e.g. rf"(^|.*\.){name}($|\..*)".
NAME_FIELDS = ("modules_to_save", "layers_pattern")
# mapping keys that PEFT's get_pattern_key matches as re.match(rf"(.*\.)?({key})$", module name).
RESOLVED_PATTERNS = ("rank_pattern", "alpha_pattern", "lambda_pattern")
# peft types whose *_pattern keys PEFT reads some other way: only plain keys are accepted.
OTHER_PATTERN_RULES = ("ADALORA", "OSF")
# integer fields that size the tensors PEFT allocates: at most the largest dimension of the expert.
SIZE_FIELDS = ("r", "target_r", "init_r", "num_virtual_tokens", "token_dim", "encoder_hidden_size")
REFUSED_TYPES = {"XLORA": "loads the adapters its config names from disk or the Hub",
                 "SHADOW": "loads the model its config names from disk or the Hub",
                 "CARTRIDGE": "reads the adapter directories its config names"}
# initialisations that read caches or data named in the config when PEFT builds the adapter
REFUSED_INITS = ("eva", "corda", "loftq", "lora_ga")
# prompt initialisations that fetch a tokenizer or read a state file; the loaded tensors replace
# whatever they would compute, so RANDOM (which reads nothing) gives the same adapter
NEUTRAL_PROMPT_INIT = "RANDOM"


def module_names_of(tensor_names: Iterable[str]) -> list[str]:
    """The module names an adapter's saved tensors imply: every dotted prefix of each tensor name,
    without PEFT's ``base_model.model.`` prefix (what PEFT's model keys look like)."""
    found: set[str] = set()
    for name in tensor_names:
        for prefix in ("base_model.model.", "base_model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(found)


def checked_config(raw: object, module_names: Sequence[str], largest: int, path: object) -> dict[str, Any]:
    """``raw`` (the header's ``adapter_config``) as PEFT may read it: see the module docstring.
    ``module_names``: the names the adapter's patterns are evaluated against; ``largest``: the
    largest dimension of the expert's tensors. Raises :class:`~compeft.errors.SourceError`."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if not isinstance(raw, dict):
        raise SourceError("adapter_config is not a JSON object", path)
    peft_type = raw.get("peft_type")
    if type(peft_type) is not str or peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise SourceError(f"adapter_config peft_type {_short(peft_type)} is not one this PEFT knows", path)
    if peft_type in REFUSED_TYPES:
        raise SourceError(f"adapter_config peft_type {peft_type}: not loaded from a file (it "
                          f"{REFUSED_TYPES[peft_type]})", path)
    fields = _fields(PEFT_TYPE_TO_CONFIG_MAPPING[peft_type])
    config: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields or key == "runtime_config":  # PEFT drops both when it reads a config file
            continue
        hint, default = fields[key]
        if not (_equal(value, default) or (hint is not None and _conforms(value, hint))):
            raise SourceError(f"adapter_config {key}: expected {_describe(hint)}, got {_short(value)}", path)
        config[key] = value
    _check_effects(config, path)
    budget = Budget(4_000_000 + 8 * sum(len(n) for n in module_names))
    try:
        for key in SELECTORS:
            if isinstance(config.get(key), str) and not PLAIN.fullmatch(config[key]):
                pattern = Pattern(config[key])
                config[key] = literal_union(n for n in module_names if pattern.fullmatch(n, budget))
        for key in NAME_FIELDS:
            value = config.get(key)
            for entry in [value] if isinstance(value, str) else value or ():
                if not PLAIN.fullmatch(entry):
                    raise SourceError(f"adapter_config {key}: {_short(entry)} is not a plain module name "
                                      "(letters, digits, _ . -)", path)
        for key in [k for k in config if k.endswith("_pattern") and isinstance(config[k], dict)]:
            config[key] = _pattern_mapping(config[key], key, peft_type, module_names, budget, path)
    except PatternError as exc:
        raise SourceError(f"adapter_config: {exc}", path) from None
    for key in SIZE_FIELDS:
        if type(config.get(key)) is int and config[key] > max(largest, 1):
            raise SourceError(f"adapter_config {key} = {config[key]} is larger than any dimension of the expert's "
                              f"tensors ({largest})", path)
    return config


def _pattern_mapping(mapping: dict[str, Any], key: str, peft_type: str, names: Sequence[str], budget: Budget,
                     path: object) -> dict[str, Any]:
    """A ``*_pattern`` mapping with typed values and each key plain or resolved to module names."""
    ranks = peft_type == "ADALORA" and key == "rank_pattern"  # AdaLoRA keeps masks of kept ranks
    out: dict[str, Any] = {}
    for pattern, value in mapping.items():
        numeric = type(value) in (int, float) and abs(value) <= MAX_INT
        if not (ranks and type(value) is list and all(type(v) is bool for v in value)) and not numeric:
            raise SourceError(f"adapter_config {key}: the value of {_short(pattern)} is not a number", path)
        if PLAIN.fullmatch(pattern):
            out[pattern] = value
        elif key in RESOLVED_PATTERNS and peft_type not in OTHER_PATTERN_RULES:
            compiled = Pattern(rf"(.*\.)?({pattern})$")  # what get_pattern_key runs, as PEFT writes it
            matched = [n for n in names if compiled.match(n, budget)]
            if matched:
                out.setdefault(literal_union(matched), value)
        else:
            raise SourceError(f"adapter_config {key}: key {_short(pattern)} is not a plain module name", path)
    return out


def _check_effects(config: dict[str, Any], path: object) -> None:
    """Refuse what makes PEFT read files, fetch or import while it builds the adapter."""
    if config.get("megatron_config") is not None:
        raise SourceError("adapter_config megatron_config: not loaded from a file (PEFT imports the module "
                          "its config names)", path)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().replace("-", "_") in REFUSED_INITS:
        raise SourceError(f"adapter_config init_lora_weights {init!r}: PEFT would read caches or data for it when "
                          "building the adapter; save the adapter with init_lora_weights=True", path)
    if "prompt_tuning_init" in config and config["prompt_tuning_init"] != NEUTRAL_PROMPT_INIT:
        config["prompt_tuning_init"] = NEUTRAL_PROMPT_INIT
        for key in ("tokenizer_name_or_path", "tokenizer_kwargs", "prompt_tuning_init_state_dict_path"):
            config.pop(key, None)


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation or None when it cannot be resolved, default) of a config dataclass."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot evaluate: defaults only
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            try:
                default = f.default_factory()  # type: ignore[misc]
            except Exception:  # noqa: BLE001
                default = dataclasses.MISSING
        else:
            default = dataclasses.MISSING
        out[f.name] = (hints.get(f.name), default)
    return out


def _equal(value: Any, default: Any) -> bool:
    return default is not dataclasses.MISSING and type(value) is type(default) and value == default


def _text(value: object) -> bool:
    if type(value) is not str or len(value) > MAX_TEXT:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    return True


def _json(value: object, depth: int = 0) -> bool:
    """A JSON value PEFT may be handed where it expects anything."""
    if value is None or type(value) in (bool, float):
        return True
    if type(value) is int:
        return abs(value) <= MAX_INT
    if type(value) in (list, dict) and (depth >= MAX_DEPTH or len(value) > MAX_ITEMS):  # type: ignore[arg-type]
        return False
    if type(value) is list:
        return all(_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(_text(k) and _json(v, depth + 1) for k, v in value.items())
    return _text(value)


def _conforms(value: object, hint: Any, depth: int = 0) -> bool:
    """Whether the JSON ``value`` has the type ``hint`` (a dataclass field's annotation)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if depth >= MAX_DEPTH:
        return False
    if hint is Any or hint is object:
        return _json(value, depth)
    if hint is type(None):
        return value is None
    if origin is Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        return any(_conforms(value, a, depth + 1) for a in args)
    if origin is Literal:  # (a literal "name_[...]" stands for every "name_..." , e.g. pissa_niter_[number of iters])
        return any(type(value) is type(a) and (value == a or isinstance(a, str) and "[" in a
                                               and value.startswith(a[:a.index("[")])) for a in args)
    if hint is bool:
        return type(value) is bool
    if hint is int:
        return type(value) is int and abs(value) <= MAX_INT
    if hint is float:
        return type(value) in (int, float) and abs(value) <= 1e300
    if hint is str:
        return _text(value)
    if hint in (list, tuple) or origin in (list, tuple, collections.abc.Sequence):
        if type(value) is not list or len(value) > MAX_ITEMS:
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a, depth + 1) for v, a in zip(value, args))
        return all(_conforms(v, args[0] if args else Any, depth + 1) for v in value)
    if hint is dict or origin in (dict, collections.abc.Mapping):
        key_hint, value_hint = args if len(args) == 2 else (str, Any)
        return (type(value) is dict and len(value) <= MAX_ITEMS
                and all(_conforms(k, key_hint, depth + 1) and _conforms(v, value_hint, depth + 1)
                        for k, v in value.items()))
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return type(value) is str and value in {m.value for m in hint}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        fields = _fields(hint)
        return type(value) is dict and all(k in fields and (_equal(v, fields[k][1]) or (
            fields[k][0] is not None and _conforms(v, fields[k][0], depth + 1))) for k, v in value.items())
    return False  # an annotation PEFT's dataclass cannot take from JSON: only the default


def _describe(hint: Any) -> str:
    if hint is None:
        return "its default"
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def _short(value: object) -> str:
    """A value for an error message: repr, cut, with surrogates and control characters escaped."""
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, (list, dict)):
        return type(value).__name__
    text = ascii(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
