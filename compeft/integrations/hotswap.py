"""Hot-swapping a compressed LoRA expert into a live PEFT adapter, in place.

:func:`compeft.integrations.peft.hotswap` is the public verb; this module holds its two halves:

* :func:`plan_swap` checks everything that needs no payload: the adapter exists and is not merged,
  the configs are compatible (PEFT's ``check_hotswap_configs_compatible``: ``use_rslora``,
  ``lora_dropout``, ``alpha_pattern``, ``use_dora``), every tensor of the expert is a parameter of
  the adapter, each fits it (the same shape, or a smaller rank that PEFT pads with zeros: a model
  prepared by ``prepare_model_for_compiled_hotswap(target_rank=…)`` holds that rank), dtypes are
  floating and the weights are real (not on the ``meta`` device);
* :meth:`Swap.run` reads every payload, verifies its CRC and decodes each chunk once without output
  (so nothing can fail halfway), allocates what it needs, and only then writes: each tensor is
  decoded straight into its parameter's storage where the shape and dtype match (else into a
  scratch tensor copied over a zero-filled parameter, as PEFT pads), the adapter's parameters the
  expert lacks are zeroed (as PEFT does), and each module's scaling is set to
  ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) of the *expert's* config, filled in place when
  ``prepare_model_for_compiled_hotswap`` made it a tensor.

Parameters keep their objects and storage (same ``data_ptr``), so a ``torch.compile``'d model is
not recompiled. One deliberate difference from PEFT: an expert of a larger rank than the live
tensors is refused (PEFT would ``swap_tensors``, changing the parameters' shape).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BaseMismatchError, InvalidArgumentError
from ..expert import CompressedExpert
from ..memory import allocate, check_outputs
from ..plan import ACCUMULATE, DECODE, TensorPlan
from ..dtypes import DTYPE_TO_TORCH

PEFT_PREFIX = "base_model.model."
LORA_PREFIX = "lora_"
# a bf16/fp16 expert into float32 parameters (PEFT's autocast_adapter_dtype): the ±magnitude added
# into zeros by the kernel in float32 is exactly the decoded value widened, without torch's slow
# mixed-dtype copy_ (~100 ns per entry on these CPUs)
WIDEN = "widen"
COPY = "copy"


@dataclass
class Target:
    """One tensor of the expert and the live parameter it goes into."""

    name: str  # the expert's (saved) name
    key: str  # the live parameter's name
    param: torch.Tensor
    how: str  # DECODE: straight into the parameter; WIDEN: added into it zeroed (float32); COPY: via scratch


@dataclass
class Swap:
    """A checked swap: run it with :meth:`run`."""

    expert: CompressedExpert
    adapter_name: str
    targets: list[Target]
    zeroed: list[torch.Tensor]  # adapter parameters the expert lacks
    scalings: list[tuple[Any, float]]  # (LoRA layer, new scaling)

    @torch.no_grad()
    def run(self) -> None:
        """Read and verify every payload, allocate, then write (no failure after the first write
        but a hardware one)."""
        by_device: dict[torch.device, list[Target]] = {}
        for t in self.targets:
            by_device.setdefault(t.param.device, []).append(t)
        # reads, CRC-checks, decodes every chunk without output; CPU weights: the Numba executor
        executors = [(self.expert.executor(None if device.type == "cpu" else device, [t.name for t in group],
                                           check=True), device, group) for device, group in by_device.items()]
        scratch_sizes = [(t.name, self.expert.entry(t.name).numel * DTYPE_TO_TORCH[self.expert.entry(t.name).dtype]
                          .itemsize) for t in self.targets if t.how == COPY]
        check_outputs(scratch_sizes, self.expert.path)
        runs = []
        for executor, device, group in executors:
            plans, copies = [], []
            for t in group:
                e = self.expert.entry(t.name)
                if t.how == DECODE:
                    plans.append(TensorPlan(t.name, DECODE, t.param.data))
                elif t.how == WIDEN:  # the whole parameter, or the leading rows of a padded lora_A
                    plans.append(TensorPlan(t.name, ACCUMULATE, t.param.data[:e.shape[0]]))
                else:
                    out = allocate(e, e.shape, DTYPE_TO_TORCH[e.dtype], self.expert.path, device=t.param.device)
                    copies.append((t, out))
                    plans.append(TensorPlan(t.name, DECODE, out))
            runs.append((executor, device.type != "cpu", plans, copies))
        # -- nothing was written above this line --
        for tensor in self.zeroed + [t.param for t in self.targets if t.how == WIDEN]:
            tensor.data.zero_()
        for executor, on_device, plans, copies in runs:
            if on_device:  # the GPU executor decodes into zeroed outputs (it writes the kept entries only)
                for plan in plans:
                    plan.out.zero_()
            executor.run(plans)
            for t, out in copies:
                pad_into(t.param.data, out, t.key)
        for layer, scaling in self.scalings:
            set_scaling(layer, self.adapter_name, scaling)


def pad_into(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
    """``param`` = ``value`` zero-padded along the rank (LoRA A: rows; B: columns), as PEFT pads."""
    if param.shape == value.shape:
        param.copy_(value)
        return
    param.zero_()
    if ".lora_A." in key or ".lora_embedding_B." in key:
        param[:value.shape[0]].copy_(value)
    else:
        param[:, :value.shape[1]].copy_(value)


def set_scaling(layer: Any, adapter_name: str, scaling: float) -> None:
    """PEFT's ``_update_scaling``: a tensor scaling (a model prepared for compiled hot-swap) is filled in place."""
    old = layer.scaling[adapter_name]
    if isinstance(old, torch.Tensor):
        old.fill_(scaling)
    elif old != scaling:
        layer.scaling[adapter_name] = scaling


def live_key(name: str, adapter_name: str) -> str:
    """The live parameter name of a saved adapter tensor (PEFT's ``_insert_adapter_name_into_state_dict``)."""
    if LORA_PREFIX not in name:
        head, _, last = name.rpartition(".")
        return f"{head}.modules_to_save.{adapter_name}.{last}"
    suffix = name.rpartition(LORA_PREFIX)[2]
    if "." not in suffix:
        return f"{name}.{adapter_name}"
    rest = suffix.split(".", 1)[1]
    return re.sub(re.escape(rest) + "$", f"{adapter_name}.{rest}", name)


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile``'s wrapper (its parameters are the same objects)."""
    while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
        model = model._orig_mod
    return model


def fits(live: tuple[int, ...], new: tuple[int, ...], key: str) -> bool:
    """The same shape, or a smaller rank along the rank axis only (PEFT's zero padding)."""
    if live == new:
        return True
    if len(live) != len(new) or len(live) not in (2, 4):
        return False
    axis = 0 if ".lora_A." in key or ".lora_embedding_B." in key else 1
    return all(n == o if i != axis else n <= o for i, (o, n) in enumerate(zip(live, new)))


def scaling_of(config: Any, module: str) -> float:
    """``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``) of ``module`` under ``config``, patterns matched as
    PEFT matches them when it builds the layer (``re.match(rf"(.*\\.)?({key})$", module)``)."""
    def pattern(mapping: dict[str, Any] | None, default: Any) -> Any:
        for key, value in (mapping or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pattern(config.rank_pattern, config.r)
    alpha = pattern(config.alpha_pattern, config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def plan_swap(model: torch.nn.Module, expert: CompressedExpert, adapter_name: str, config: Any) -> Swap:
    """Check the swap of ``expert`` (its LoRA ``config``, a ``peft.LoraConfig``) into adapter
    ``adapter_name`` of ``model`` from headers and the live model only; raise a
    :mod:`compeft.errors` exception naming the expert on any mismatch."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.hotswap import check_hotswap_configs_compatible

    path = expert.path
    inner = unwrapped(model)
    configs = getattr(inner, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        raise InvalidArgumentError(f"the model has no adapter named {adapter_name!r} to swap (load one first with "
                                   "compeft.integrations.peft.load_adapter or PeftModel.from_pretrained)", path)
    try:
        check_hotswap_configs_compatible(configs[adapter_name], config)
    except (ValueError, TypeError, KeyError) as exc:
        raise BaseMismatchError(f"cannot hot-swap into adapter {adapter_name!r}: {str(exc).splitlines()[0][:200]}",
                                path) from None
    layers = {name: m for name, m in inner.named_modules() if isinstance(m, BaseTunerLayer)}
    if any(adapter_name in m.merged_adapters for m in layers.values()):
        raise InvalidArgumentError(f"adapter {adapter_name!r} is merged into the base weights; unmerge it first", path)
    params = dict(inner.named_parameters())
    stripped = not any(k.startswith(PEFT_PREFIX) for k in params)  # a Transformers model with PEFT's integration
    targets: list[Target] = []
    scalings: dict[str, tuple[Any, float]] = {}
    for name in expert.names:
        e = expert.entry(name)
        key = live_key(name, adapter_name)
        if stripped and key.startswith(PEFT_PREFIX):
            key = key[len(PEFT_PREFIX):]
        param = params.get(key)
        if param is None:
            raise BaseMismatchError(f"tensor {name!r} of the expert is not a parameter of adapter {adapter_name!r} "
                                    f"(no {key!r}): the expert targets other modules", path)
        if e.role != "delta" or e.init:
            raise InvalidArgumentError(f"tensor {name!r} is stored as a {e.role} (init {e.init}): not a LoRA weight",
                                       path)
        dtype = DTYPE_TO_TORCH[e.dtype]
        if not dtype.is_floating_point or not param.is_floating_point():
            raise BaseMismatchError(f"tensor {name!r}: cannot copy a {dtype} tensor into a {param.dtype} parameter",
                                    path)
        if param.device.type == "meta":
            raise BaseMismatchError(f"parameter {key!r} of the adapter is on the meta device (not materialized)", path)
        if not fits(tuple(param.shape), e.shape, key):
            raise BaseMismatchError(f"tensor {name!r}: expert shape {list(e.shape)} does not fit the adapter's "
                                    f"{list(param.shape)} (a larger rank than the live one: prepare the model with "
                                    "peft.utils.hotswap.prepare_model_for_compiled_hotswap(target_rank=...) "
                                    "before loading or compiling)", path)
        same = tuple(param.shape) == e.shape
        if same and param.dtype == dtype and param.is_contiguous():
            how = DECODE
        elif param.dtype == torch.float32 and param.is_contiguous() and (same or tuple(param.shape[1:]) == e.shape[1:]):
            how = WIDEN  # (a smaller rank: only lora_A's rows are a contiguous prefix)
        else:
            how = COPY
        targets.append(Target(name, key, param, how))
        if LORA_PREFIX in name:
            module_name = key.rsplit(".", 3)[0]  # less 'lora_A.<adapter>.weight'
            layer = layers.get(module_name)
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.scaling:
                raise BaseMismatchError(f"tensor {name!r}: module {module_name!r} is not a LoRA layer of adapter "
                                        f"{adapter_name!r}", path)
            short = module_name[len(PEFT_PREFIX):] if module_name.startswith(PEFT_PREFIX) else module_name
            scalings[module_name] = (layer, scaling_of(config, short))
    swapped = {t.key for t in targets}
    zeroed = [p for k, p in params.items()
              if LORA_PREFIX in k and f".{adapter_name}." in k and k not in swapped]
    return Swap(expert, adapter_name, targets, zeroed, list(scalings.values()))
