"""mergekit merge configurations (``compeft merge --config``): read safely, validated whole before
any payload is read, and resolved per tensor (filters, gradients) as mergekit resolves them.

The schema is mergekit's (``mergekit/config.py``): ``merge_method``, ``base_model``, ``models`` (each
``model`` and its ``parameters``), top-level ``parameters``, ``dtype`` and ``out_dtype``; compeft adds
``library``. A parameter is a scalar, a gradient (a list of numbers interpolated across the layers),
a ``{filter, value}`` condition or a list of them; a model's own parameters take precedence over the
top-level ones. What compeft cannot do (slices, LoRA references, tokenizer surgery, methods it does
not implement) is refused with an :class:`~compeft.errors.InvalidArgumentError` naming the key.
docs/merging.md ("mergekit configs") has the rules; no torch here.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import InvalidArgumentError

MISSING: Any = object()
SHARED, INPUT, NON_BASE = "shared", "input", "non_base"  # mergekit's ParameterScope
LAYER = re.compile(r"(?:^|\.)(layers|h|blocks|block|layer)\.(\d+)\.")  # "model.layers.7.mlp…"
DTYPES = ("float32", "bfloat16", "float16", "float64")
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "library", "tokenizer_source")
REFUSED_KEYS = {
    "slices": "layer-range slices (frankenmerges) need whole models; compeft merges task vectors of one shape",
    "modules": "per-module definitions are not supported; use models",
    "tokenizer": "tokenizer surgery is not supported (the output copies the base's tokenizer files)",
    "chat_template": "chat templates are not written (the output copies the base's tokenizer files)",
}
BOOL_TEXT = {"0": False, "off": False, "f": False, "false": False, "n": False, "no": False,
             "1": True, "on": True, "t": True, "true": True, "y": True, "yes": True}  # pydantic's lax bools


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its kind (``float``, ``bool``, ``float?`` for float or null),
    mergekit's scope (shared, per input, per non-base input), default and valid closed range."""

    kind: str
    scope: str
    default: Any = MISSING
    low: float = -math.inf
    high: float = math.inf


@dataclass(frozen=True)
class Method:
    """A merge method a config can name: its parameters, whether it needs a base (``required``), may
    have one (``optional``) or treats the base as one more input (``ignored``, as mergekit), how many
    experts it takes, and the family of formulas (compeft.merge_methods) that computes it."""

    name: str
    family: str  # gta, peft_ties, linear, passthrough, model_stock, nuslerp, sce
    params: dict[str, Param]
    base: str = "required"
    min_experts: int = 1
    max_experts: int | None = None
    consensus: bool = False  # TIES sign election (mergekit's "sum" consensus)
    sparsify: str | None = None  # magnitude, random, magnitude_outliers, della


def _gta(name: str, consensus: bool, sparsify: str | None, normalize: bool, rescale: bool) -> Method:
    params = {"int8_mask": Param("bool", SHARED, False), "normalize": Param("bool", SHARED, normalize),
              "rescale": Param("bool", SHARED, rescale), "lambda": Param("float", SHARED, 1.0),
              "weight": Param("float", NON_BASE), "density": Param("float", NON_BASE, 1.0, 0.0, 1.0)}
    if sparsify == "magnitude_outliers":
        params["gamma"] = Param("float", NON_BASE, 0.01, 0.0, 1.0)
    if sparsify == "della":
        params["epsilon"] = Param("float", NON_BASE, 0.15, 0.0, 1.0)
    return Method(name, "gta", params, consensus=consensus, sparsify=sparsify)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("linear", "linear", {"weight": Param("float", INPUT), "normalize": Param("bool", SHARED, True)},
           base="ignored"),
    Method("passthrough", "passthrough", {"scale": Param("float?", INPUT, None)}, base="ignored", max_experts=1),
    _gta("task_arithmetic", False, None, False, False),
    _gta("ties", True, "magnitude", True, False),
    _gta("dare_ties", True, "random", False, True),
    _gta("dare_linear", False, "random", False, True),
    _gta("breadcrumbs", False, "magnitude_outliers", False, False),
    _gta("breadcrumbs_ties", True, "magnitude_outliers", False, False),
    _gta("della", True, "della", True, True),
    _gta("della_linear", False, "della", False, True),
    Method("model_stock", "model_stock", {"filter_wise": Param("bool", SHARED, False)}, min_experts=2),
    Method("nuslerp", "nuslerp", {"weight": Param("float", NON_BASE), "nuslerp_row_wise": Param("bool", SHARED, False),
                                  "nuslerp_flatten": Param("bool", SHARED, True)},
           min_experts=2, max_experts=2),
    Method("sce", "sce", {"int8_mask": Param("bool", SHARED, False),
                          "select_topk": Param("float", SHARED, 1.0, 0.0, 1.0)}),
    # compeft's own: PEFT's TIES rule (unweighted election, mean over the agreeing experts), as
    # compeft.merge(method="ties"); not a mergekit method
    Method("peft_ties", "peft_ties", {"weight": Param("float", NON_BASE, 1.0), "density": Param("float", NON_BASE, 1.0, 0.0, 1.0),
                                      "lambda": Param("float", SHARED, 1.0)}, consensus=True, sparsify="magnitude"),
)}


@dataclass
class Input:
    """One input of the merge, in mergekit's order: an expert (``model`` names a ``.cpeft`` path, URL
    or library name) or the base (its task vector is 0)."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)
    is_base: bool = False


@dataclass
class MergeConfig:
    """A validated config. ``inputs`` are mergekit's: the models in order, then the base when
    ``base_model`` is set but not listed (mergekit adds it; methods that ignore the base then
    merge it as one more model)."""

    method: Method
    base_model: str | None
    inputs: list[Input]
    parameters: dict[str, Any]
    dtype: str | None = None
    out_dtype: str | None = None
    library: str | None = None
    text: dict[str, Any] = field(default_factory=dict)  # the config as read, for the output's metadata

    @property
    def experts(self) -> list[Input]:
        return [i for i in self.inputs if not i.is_base]

    @property
    def operands(self) -> list[Input]:
        """The inputs a method combines: every input when the method ignores the base, else the experts."""
        return self.inputs if self.method.base == "ignored" else self.experts


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> MergeConfig:
    """A config from a YAML file (``yaml.safe_load``) or an already parsed mapping, validated: known
    keys and types, a supported method, every parameter known to it and well formed. Per-tensor
    values (gradients, filters) are checked later by :func:`resolve`, still before any payload."""
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        try:
            import yaml
        except ImportError:  # PyYAML comes with transformers; compeft itself does not require it
            raise InvalidArgumentError("reading a YAML merge config needs PyYAML (pip install pyyaml); or pass the "
                                       "parsed mapping") from None
        try:
            with open(source, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read the merge config ({exc.strerror or exc})", source) from None
        except yaml.YAMLError as exc:
            raise InvalidArgumentError(f"the merge config is not valid YAML: {str(exc).splitlines()[0]}",
                                       source) from None
    if not isinstance(data, dict):
        raise InvalidArgumentError("a merge config must be a mapping with merge_method, models, …")
    for key in data:
        if key in REFUSED_KEYS:
            raise InvalidArgumentError(f"config key {key!r}: {REFUSED_KEYS[key]}")
        if key not in TOP_KEYS:
            raise InvalidArgumentError(f"unknown config key {key!r} (known: {', '.join(TOP_KEYS)})")
    name = data.get("merge_method")
    if not isinstance(name, str):
        raise InvalidArgumentError("config key 'merge_method' is required and must be a string")
    if name not in METHODS:
        raise InvalidArgumentError(f"merge_method {name!r} is not supported by compeft (supported: "
                                   f"{', '.join(METHODS)})")
    method = METHODS[name]
    base = _optional_text(data, "base_model")
    library = _optional_text(data, "library")
    if data.get("tokenizer_source") not in (None, "base"):
        raise InvalidArgumentError("config key 'tokenizer_source': only 'base' is supported (the output copies the "
                                   "base's tokenizer files)")
    dtypes = {}
    for key in ("dtype", "out_dtype"):
        value = _optional_text(data, key)
        if value is not None and value.removeprefix("torch.") not in DTYPES:
            raise InvalidArgumentError(f"config key {key!r}: {value!r} is not one of {', '.join(DTYPES)}")
        dtypes[key] = None if value is None else value.removeprefix("torch.")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise InvalidArgumentError("config key 'models' is required: a list of {model: …, parameters: …}")
    inputs: list[Input] = []
    for k, item in enumerate(models):
        where = f"models[{k}]"
        if not isinstance(item, dict):
            raise InvalidArgumentError(f"{where} must be a mapping with a 'model' key")
        unknown = sorted(set(item) - {"model", "parameters"})
        if unknown:
            raise InvalidArgumentError(f"{where}: unknown key {unknown[0]!r} (known: model, parameters)")
        model = item.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidArgumentError(f"{where}.model must be a non-empty string (a .cpeft path, URL or library name)")
        if "+" in model:
            raise InvalidArgumentError(f"{where}.model {model!r}: mergekit's MODEL+LORA syntax is not supported "
                                       "(compress the LoRA and name the .cpeft)")
        if any(i.model == model for i in inputs):
            raise InvalidArgumentError(f"{where}.model {model!r} is listed twice")
        is_base = base is not None and model == base
        inputs.append(Input(model, _parameters(item.get("parameters"), method, f"{where}.parameters", is_base), is_base))
    if base is not None and not any(i.is_base for i in inputs):
        inputs.append(Input(base, {}, True))
    parameters = _parameters(data.get("parameters"), method, "parameters", False)
    config = MergeConfig(method, base, inputs, parameters, dtypes["dtype"], dtypes["out_dtype"], library, data)
    _check_counts(config)
    return config


def _optional_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise InvalidArgumentError(f"config key {key!r} must be a non-empty string")
    return value


def _check_counts(config: MergeConfig) -> None:
    method, experts = config.method, len(config.experts)
    if method.base == "required" and config.base_model is None:
        raise InvalidArgumentError(f"merge_method {method.name!r} needs base_model (the model the experts were made "
                                   "from)")
    if method.name == "nuslerp" and config.base_model is None:
        raise InvalidArgumentError("nuslerp without base_model interpolates whole models; compeft merges task "
                                   "vectors: set base_model")
    if method.base == "ignored" and method.max_experts == 1 and len(config.inputs) != 1:
        raise InvalidArgumentError("passthrough takes exactly one model (with base_model set, mergekit adds the base "
                                   "as a second one: pass the base with --base instead)")
    if experts < method.min_experts:
        raise InvalidArgumentError(f"merge_method {method.name!r} needs at least {method.min_experts} expert"
                                   f"{'s' if method.min_experts > 1 else ''} besides the base, got {experts}")
    if method.max_experts is not None and experts > method.max_experts:
        raise InvalidArgumentError(f"merge_method {method.name!r} takes at most {method.max_experts} experts, "
                                   f"got {experts}")


def _parameters(value: Any, method: Method, where: str, is_base: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{where} must be a mapping of parameter names to values")
    out = {}
    for name, setting in value.items():
        if name not in method.params:
            raise InvalidArgumentError(f"{where}.{name}: not a parameter of {method.name} (its parameters: "
                                       f"{', '.join(method.params) or 'none'})")
        out[name] = _setting(setting, method.params[name], f"{where}.{name}")
    return out


def _setting(value: Any, spec: Param, where: str) -> Any:
    """A setting's structure checked: a scalar, a gradient, a condition, or a list of conditions."""
    if isinstance(value, dict):
        return [_condition(value, spec, where)]
    if isinstance(value, list):
        if not value:
            raise InvalidArgumentError(f"{where}: an empty list")
        if all(isinstance(v, dict) for v in value):
            return [_condition(v, spec, f"{where}[{k}]") for k, v in enumerate(value)]
        for k, v in enumerate(value):
            scalar(v, spec, f"{where}[{k}]")
        return list(value)
    scalar(value, spec, where)
    return value


def _condition(value: dict[str, Any], spec: Param, where: str) -> dict[str, Any]:
    unknown = sorted(set(value) - {"filter", "value"})
    if unknown or "value" not in value:
        raise InvalidArgumentError(f"{where}: a condition is {{filter: TEXT, value: …}}"
                                   + (f" (unknown key {unknown[0]!r})" if unknown else " (value missing)"))
    if value.get("filter") is not None and not isinstance(value["filter"], str):
        raise InvalidArgumentError(f"{where}.filter must be a string")
    inner = value["value"]
    if isinstance(inner, dict) or (isinstance(inner, list) and (not inner or any(isinstance(v, (dict, list))
                                                                                for v in inner))):
        raise InvalidArgumentError(f"{where}.value must be a scalar or a list of scalars (a gradient)")
    for k, v in enumerate(inner if isinstance(inner, list) else [inner]):
        scalar(v, spec, f"{where}.value" + (f"[{k}]" if isinstance(inner, list) else ""))
    return {"filter": value.get("filter"), "value": inner}


def scalar(value: Any, spec: Param, where: str) -> Any:
    """One scalar as its parameter's kind (mergekit's lax rules: "1e-3" is a number, "yes" a bool)."""
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in BOOL_TEXT:
            return BOOL_TEXT[value.strip().lower()]
        raise InvalidArgumentError(f"{where}: expected true or false, got {value!r}")
    if value is None and spec.kind == "float?":
        return None
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise InvalidArgumentError(f"{where}: expected a finite number, got {value!r}")
    return float(number)


def evaluate(setting: Any, spec: Param, name: str, t: float) -> Any:
    """mergekit's ``evaluate_setting``: conditions in order, the first whose filter is absent, ``*``
    or a substring of ``name`` wins (none: None); a list of numbers is interpolated linearly at
    ``t`` over evenly spaced points (a list of bools picks ``values[int(t·(n−1))]``)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            if cond["filter"] in (None, "*") or (name and cond["filter"] in name):
                return evaluate(cond["value"], spec, name, t)
        return None
    if isinstance(setting, list):
        values = [scalar(v, spec, "") for v in setting]
        if spec.kind == "bool" or any(v is None for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return scalar((1 - frac) * values[i0] + frac * values[i1], spec, "")
    return scalar(setting, spec, "")


def layer_positions(names: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """mergekit's ``t`` per tensor: layer i of L gets i / (L − 1) (1 when L is 1), every other
    tensor (embeddings, final norm, head) 0. A layer is the number after ``layers.``, ``h.``,
    ``blocks.``, ``block.`` or ``layer.`` in the name, L the largest such number + 1. Also returns
    the distinct layer stacks (the text before the number): gradients need exactly one."""
    found: dict[str, tuple[str, int]] = {}
    for name in names:
        m = LAYER.search(name)
        if m:
            found[name] = (name[:m.start(2)], int(m.group(2)))
    stacks = sorted({s for s, _ in found.values()})
    count = {s: 1 + max(i for t, i in found.values() if t == s) for s in stacks}
    out = {}
    for name in names:
        if name in found:
            stack, i = found[name]
            out[name] = i / (count[stack] - 1) if count[stack] > 1 else 1.0
        else:
            out[name] = 0.0
    return out, stacks


def uses_gradient(config: MergeConfig) -> bool:
    """Whether any parameter is a list of numbers (a gradient over layers)."""
    def walk(setting: Any) -> bool:
        if isinstance(setting, list):
            return any(walk(c["value"]) for c in setting) if setting and isinstance(setting[0], dict) else len(setting) > 1
        return False
    return any(walk(s) for scope in [config.parameters, *(i.parameters for i in config.inputs)] for s in scope.values())


@dataclass
class TensorParams:
    """The parameters of one tensor: ``shared`` and, per operand (``MergeConfig.operands``), its own."""

    shared: dict[str, Any]
    per_operand: list[dict[str, Any]]


def resolve(config: MergeConfig, name: str, t: float,
            check: Callable[[str, str, Any, str], None] | None = None) -> TensorParams:
    """Every parameter of ``name`` at layer position ``t`` (mergekit's precedence: the model's own
    parameters, then the top-level ones, then the method's default; a required one missing is an
    error naming it). Ranges are checked here, so a bad value at any layer fails before a merge."""
    method = config.method
    shared = {p: _one(config, method, p, spec, name, t, None) for p, spec in method.params.items() if spec.scope == SHARED}
    per = []
    for op in config.operands:
        values = {}
        for p, spec in method.params.items():
            if spec.scope == INPUT or (spec.scope == NON_BASE and not op.is_base):
                values[p] = _one(config, method, p, spec, name, t, op)
        per.append(values)
    return TensorParams(shared, per)


def _one(config: MergeConfig, method: Method, pname: str, spec: Param, name: str, t: float, op: Input | None) -> Any:
    sources = ([op.parameters] if op is not None else []) + [config.parameters]
    for scope in sources:
        if pname in scope:
            value = evaluate(scope[pname], spec, name, t)
            if value is not None:
                return _in_range(value, spec, pname, name, op)
    if spec.default is MISSING:
        who = f" of model {op.model!r}" if op is not None else ""
        hint = (" (mergekit adds base_model as an input of this method: give it a weight in models, set a top-level "
                "weight, or pass the base with --base / base= instead of base_model)") if op is not None and op.is_base else ""
        raise InvalidArgumentError(f"parameter {pname!r}{who} is missing for tensor {name!r}{hint}")
    return spec.default


def _in_range(value: Any, spec: Param, pname: str, name: str, op: Input | None) -> Any:
    if isinstance(value, float) and not spec.low <= value <= spec.high:
        who = f" of model {op.model!r}" if op is not None else ""
        raise InvalidArgumentError(f"parameter {pname!r}{who} is {value!r} for tensor {name!r}; it must be in "
                                   f"[{spec.low:g}, {spec.high:g}]")
    return value
