"""PEFT and Transformers, without files in between.

* :func:`load_adapter`: a compressed PEFT expert straight into a model as a named adapter;
* :func:`hotswap`: a compressed LoRA expert decoded into a live adapter's own tensors, in place
  (PEFT's hot-swap semantics; a compiled model is not recompiled);
* :func:`merge_into`: an expert folded into a Transformers model's own weights, in place;
* :func:`adapter_state_dict` / :func:`adapter_config`: the restored PEFT tensors and config.

Everything goes through PEFT's public API (``PeftConfig.from_peft_type``, ``PeftModel``,
``set_peft_model_state_dict``, ``merge_and_unload``), so every adapter type PEFT can load and merge
works here too; compeft only supplies the decoded tensors and turns PEFT's complaints about keys
and shapes into :mod:`compeft.errors` exceptions that name the expert.

The stored ``adapter_config`` comes from a file: :func:`compeft.integrations.peft_config.checked_config`
checks it (types, regular expressions evaluated in bounded time, sizes) before PEFT sees it, and the
adapter is built on the ``meta`` device, so PEFT allocates nothing from the config's sizes: the
decoded tensors (allocated within compeft's memory budget) become its parameters.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Mapping, Sequence

import torch

from ..applying import apply
from ..errors import BaseMismatchError, InvalidArgumentError, SourceError
from ..expert import CompressedExpert, as_expert
from ..export import decoded
from ..memory import check_outputs, output_bytes
from .hotswap import plan_swap
from .peft_config import checked_config, module_names_of

ExpertLike = CompressedExpert | str | os.PathLike[str]


def _peft_expert(expert: ExpertLike) -> CompressedExpert:
    opened = as_expert(expert)
    if opened.metadata.get("source") != "peft" or not isinstance(opened.metadata.get("adapter_config"), dict):
        raise InvalidArgumentError("this expert was not made from a PEFT adapter (no adapter_config in its header)",
                                   opened.path)
    return opened


def adapter_state_dict(expert: ExpertLike) -> dict[str, torch.Tensor]:
    """The adapter's tensors as PEFT saves them (``init`` + τ̃, e.g. 1 + τ̃ for (IA)³ vectors), under
    their saved names: what ``compeft decompress`` writes to ``adapter_model.safetensors``."""
    opened = _peft_expert(expert)
    check_outputs([(e.name, output_bytes(e)) for e in opened.header.tensors], opened.path)  # held together
    return decoded(opened, init=True)


# What PEFT raises on a config or a model it cannot use (a ValueError is also how it says that
# target modules are missing; load_adapter reports those as a base mismatch).
PEFT_FAILURES = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError)


def adapter_config(expert: ExpertLike, *, inference_mode: bool = True) -> Any:
    """The expert's ``adapter_config.json`` (stored in its header) as a ``peft.PeftConfig``, checked
    first (:func:`~compeft.integrations.peft_config.checked_config`): a regular expression in it is
    replaced by one that matches exactly the modules it matched among the expert's own tensors."""
    opened = _peft_expert(expert)
    return _config(opened, inference_mode, module_names_of(opened.names))


def _config(opened: CompressedExpert, inference_mode: bool, module_names: Sequence[str]) -> Any:
    from peft import PeftConfig

    largest = max((max(e.shape, default=0) for e in opened.header.tensors), default=0)
    fields = checked_config(opened.metadata["adapter_config"], module_names, largest, opened.path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = PeftConfig.from_peft_type(**fields)
    except PEFT_FAILURES as exc:
        raise SourceError(f"the stored adapter_config is not one this PEFT can build ({_message(exc)})",
                          opened.path) from None
    config.inference_mode = inference_mode
    return config


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _meta_keyword(function: Any) -> dict[str, bool]:
    """``low_cpu_mem_usage=True`` where this PEFT takes it: adapter weights are made on the meta
    device, so nothing is allocated from the config's ranks before the expert's tensors arrive."""
    return {"low_cpu_mem_usage": True} if "low_cpu_mem_usage" in inspect.signature(function).parameters else {}


def load_adapter(model: torch.nn.Module, expert: ExpertLike, adapter_name: str = "default", *,
                 is_trainable: bool = False) -> Any:
    """Load a compressed PEFT expert into ``model`` as adapter ``adapter_name``; no files written.

    Parameters
    ----------
    model
        A base ``torch.nn.Module`` (e.g. a Transformers model; it is wrapped in place, like
        ``PeftModel.from_pretrained`` does) or a ``peft.PeftModel`` to add the adapter to.
    expert
        A :class:`~compeft.CompressedExpert`, or anything :func:`compeft.open` accepts.
    adapter_name
        The adapter's name; must be new when ``model`` is already a ``PeftModel``.
    is_trainable
        Leave the adapter trainable (default: inference mode, like PEFT).

    Returns
    -------
    peft.PeftModel
        The model with the adapter loaded (active when it is the model's only adapter; call
        ``set_adapter`` to switch otherwise).

    Raises
    ------
    BaseMismatchError
        The model lacks a module the adapter targets, a tensor's shape differs from the model's,
        or the expert lacks tensors the adapter needs.
    SourceError
        The expert holds tensors that the adapter does not have.

    Examples
    --------
    >>> import torch, compeft, tempfile, os
    >>> from peft import LoraConfig, get_peft_model
    >>> from compeft.integrations.peft import load_adapter
    >>> d = tempfile.mkdtemp()
    >>> get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),
    ...                LoraConfig(r=2, target_modules=["0"])).save_pretrained(d)
    >>> model = load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), compeft.compress(d), "mine")
    >>> sorted(model.peft_config)
    ['mine']
    """
    from peft import PeftModel, set_peft_model_state_dict
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    opened = _peft_expert(expert)
    if isinstance(model, PeftModel) and adapter_name in model.peft_config:
        raise InvalidArgumentError(f"the model already has an adapter named {adapter_name!r}", opened.path)
    inner = model.base_model.model if isinstance(model, PeftModel) else model
    config = _config(opened, not is_trainable, [name for name, _ in inner.named_modules()])
    state = adapter_state_dict(opened)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(model, PeftModel):
                model.add_adapter(adapter_name, config, **_meta_keyword(model.add_adapter))
                peft_model = model
            else:
                cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel) if config.task_type else PeftModel
                # (the task classes pass keywords on to PeftModel)
                peft_model = cls(model, config, adapter_name, **_meta_keyword(PeftModel.__init__))
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise BaseMismatchError(f"the adapter does not fit the model: {_message(exc)}", opened.path) from None
    except PEFT_FAILURES as exc:
        raise SourceError(f"PEFT cannot build this adapter_config on the model ({_message(exc)})",
                          opened.path) from None
    _check_shapes(peft_model, state, adapter_name, opened)
    try:
        result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name,
                                           **_meta_keyword(set_peft_model_state_dict))
    except PEFT_FAILURES as exc:
        raise SourceError(f"PEFT cannot load the expert's tensors ({_message(exc)})", opened.path) from None
    if is_trainable and isinstance(model, PeftModel):
        model.set_requires_grad(adapter_name)
    if result.unexpected_keys:
        raise SourceError(f"{len(result.unexpected_keys)} tensors of the expert are not parameters of the adapter "
                          f"(e.g. {sorted(result.unexpected_keys)[:3]})", opened.path)
    missing = _adapter_missing(peft_model, result.missing_keys, adapter_name)
    if missing:
        raise BaseMismatchError(f"the expert lacks {len(missing)} tensors the adapter needs "
                                f"(e.g. {sorted(missing)[:3]})", opened.path)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def _check_shapes(peft_model: Any, state: Mapping[str, torch.Tensor], adapter_name: str,
                  expert: CompressedExpert) -> None:
    """PEFT would raise a bare RuntimeError on a size mismatch; name the tensor and the expert."""
    params = peft_model.state_dict()
    for name, tensor in state.items():
        # PEFT inserts the adapter name before the last component (and into modules_to_save copies)
        head, _, last = name.rpartition(".")
        for key in (f"{head}.{adapter_name}.{last}", f"{head}.modules_to_save.{adapter_name}.{last}", name):
            if key in params:
                if tuple(params[key].shape) != tuple(tensor.shape):
                    raise BaseMismatchError(f"tensor {name!r}: expert shape {list(tensor.shape)}, model shape "
                                            f"{list(params[key].shape)}", expert.path)
                break


def _adapter_missing(peft_model: Any, missing: list[str], adapter_name: str) -> list[str]:
    """The missing keys that belong to the adapter (PEFT reports every base weight as missing too)."""
    from peft.utils import get_peft_model_state_dict

    wanted = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    # get_peft_model_state_dict names tensors as saved; map PEFT's missing keys to that form
    saved = {k.replace(f".{adapter_name}.", ".").replace(".modules_to_save.", ".") for k in missing}
    return [k for k in wanted if k in saved]


def hotswap(model: torch.nn.Module, expert: ExpertLike, adapter_name: str = "default") -> torch.nn.Module:
    """Swap a compressed LoRA expert into ``model``'s live adapter ``adapter_name``, in place.

    Each LoRA tensor is decoded straight into the adapter's existing parameter (same module and
    parameter objects, same storage; no file written), following PEFT's
    ``hotswap_adapter_from_state_dict``: a smaller rank is padded with zeros (a model prepared with
    ``peft.utils.hotswap.prepare_model_for_compiled_hotswap(target_rank=…)`` takes any rank up to
    it), the adapter's tensors the expert lacks are zeroed, and each module's scaling becomes the
    expert's ``lora_alpha / r``. A ``torch.compile``'d model is not recompiled.

    Everything is checked before the first byte is written: the expert's header, config (PEFT's
    compatibility rules), every tensor's target, shape and dtype, then every payload's checksum and
    structure. A corrupt or mismatched expert raises a :mod:`compeft.errors` exception naming it and
    leaves the adapter bit-for-bit as it was.

    Parameters
    ----------
    model
        A ``peft.PeftModel`` (e.g. from :func:`load_adapter`), or its ``torch.compile`` wrapper.
    expert
        A :class:`~compeft.CompressedExpert` made from a LoRA adapter, or a path or URL to open.
    adapter_name
        The live adapter to overwrite; it keeps its name.

    Returns
    -------
    The same ``model``.

    Raises
    ------
    BaseMismatchError
        The expert targets modules the adapter lacks, has a larger rank, or incompatible config.
    InvalidArgumentError
        No such adapter, it is merged, or the expert is not a LoRA adapter.
    ChecksumError, CorruptPayloadError, ...
        The file is damaged (nothing written).

    Examples
    --------
    >>> import torch, compeft, tempfile
    >>> from peft import LoraConfig, get_peft_model
    >>> from compeft.integrations.peft import load_adapter, hotswap
    >>> def adapter(seed):
    ...     torch.manual_seed(seed); d = tempfile.mkdtemp()
    ...     get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"],
    ...                    init_lora_weights=False)).save_pretrained(d)
    ...     return compeft.compress(d, density=0.5)
    >>> model = load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), adapter(0))
    >>> weight = model.base_model.model[0].lora_B["default"].weight
    >>> _ = hotswap(model, adapter(1))
    >>> weight is model.base_model.model[0].lora_B["default"].weight
    True
    """
    opened = _peft_expert(expert)
    peft_type = str(opened.metadata["adapter_config"].get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise InvalidArgumentError(f"hotswap swaps LoRA adapters; this expert is a {peft_type or 'untyped'} adapter",
                                   opened.path)
    config = _config(opened, True, module_names_of(opened.names))
    plan_swap(model, opened, adapter_name, config).run()
    return model


@torch.no_grad()
def merge_into(model: torch.nn.Module, expert: ExpertLike, *, check_base: bool = True) -> torch.nn.Module:
    """Fold an expert into ``model``'s own weights, in place; returns ``model``.

    - an expert made from a PEFT adapter: loaded as an adapter, merged by PEFT
      (``merge_and_unload``: LoRA, rsLoRA, DoRA, (IA)³, ...), and the adapter layers removed again, so
      ``model`` keeps its class and modules;
    - a full fine-tune or task vector: τ̃ added with :func:`compeft.apply` into ``model.state_dict()``
      (names may carry or lack the model's ``base_model_prefix``, e.g. ``bert.``).

    Examples
    --------
    >>> import torch, compeft
    >>> from compeft.integrations.peft import merge_into
    >>> model = torch.nn.Linear(4, 4, bias=False)
    >>> before = model.weight.clone()
    >>> _ = merge_into(model, compeft.compress({"weight": torch.eye(4)}, density=0.25))
    >>> int((model.weight != before).sum())
    4
    """
    opened = as_expert(expert)
    if opened.metadata.get("source") == "peft":
        peft_model = load_adapter(model, opened, "compeft_merge")
        merged = peft_model.merge_and_unload()
        if merged is not model:  # PEFT unwraps to the same module object; say so if that ever changes
            raise InvalidArgumentError("PEFT returned a new model object from merge_and_unload", opened.path)
        return model
    state = model.state_dict(keep_vars=True)
    names = _state_names(state, opened, getattr(model, "base_model_prefix", ""))
    view = {name: state[key].data for name, key in names.items()}
    apply(opened, view, check_base=check_base)
    return model


def _state_names(state: Mapping[str, Any], expert: CompressedExpert, prefix: str) -> dict[str, str]:
    """expert name -> model state key; the two differ at most by ``prefix + '.'``."""
    out = {}
    for name in expert.names:
        for key in (name, f"{prefix}.{name}" if prefix else None,
                    name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None):
            if key is not None and key in state:
                out[name] = key
                break
    missing = [n for n in expert.names if n not in out]
    if missing:
        raise BaseMismatchError(f"{len(missing)} tensors of the expert are not in the model (e.g. {missing[:3]})",
                                expert.path)
    return out
