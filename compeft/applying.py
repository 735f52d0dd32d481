"""``apply``: add an expert's τ̃ into weights in place, straight from its compressed streams."""

from __future__ import annotations

import math
from typing import Any, MutableMapping, Sequence

import torch

from .dtypes import added
from .errors import InvalidArgumentError
from .expert import CompressedExpert, PathLike, as_expert, check_state
from .memory import allocate, check_outputs, output_bytes
from .plan import ADD, ADD_MODES, DECODE, TensorPlan
from .progress import progress_bar


class Restore:
    """What :func:`apply` with ``restorable=True`` returns: :meth:`restore` puts back, bit for bit,
    every weight value the apply changed. On a GPU it holds only the overwritten values (one 16- or
    32-bit slot per kept entry); on the CPU a copy of each weight the expert touches."""

    def __init__(self, expert: CompressedExpert, state_dict: MutableMapping[str, torch.Tensor]) -> None:
        self._expert, self._state = expert, state_dict
        self.saved: list[tuple[Any, dict[str, torch.Tensor]]] = []  # (device executor or None, saved)
        self._done = False

    def restore(self) -> None:
        """Undo the apply (once)."""
        if self._done:
            raise InvalidArgumentError("this apply was already restored", self._expert.path)
        for executor, saved in self.saved:
            if executor is None:
                for name, original in saved.items():
                    self._state[name].copy_(original)
            else:
                executor.restore_entries(self._state, saved)
        self._done = True
        self.saved.clear()


@torch.no_grad()
def apply(expert: CompressedExpert | PathLike, state_dict: MutableMapping[str, torch.Tensor], *,
          scale: float = 1.0, check_base: bool = True, restorable: bool = False, progress: bool = False
          ) -> Restore | None:
    """Add ``scale`` × τ̃ into the weights of ``state_dict`` in place (no dense copy of τ̃).

    Every kept entry does ``w = dtype(float32(w) ± step)`` with step = float32(scale) ×
    the tensor's magnitude (docs/glossary.md); ``value`` tensors are copied over their weights.
    Everything is read and verified before the first weight changes, so a corrupt expert leaves the
    weights untouched. Weights on a CUDA device are updated there, from the compressed bytes copied
    to it once (bit-identical to the CPU path). ``restorable=True`` returns a :class:`Restore` whose
    ``restore()`` undoes the apply bit for bit (hot-swapping experts in a resident model).

    Examples
    --------
    >>> import torch, compeft
    >>> base = {"w": torch.zeros(4, 4, dtype=torch.bfloat16)}
    >>> undo = compeft.apply(compeft.compress({"w": torch.eye(4)}, density=0.25), base, scale=0.5, restorable=True)
    >>> int((base["w"] != 0).sum())
    4
    >>> undo.restore(); int((base["w"] != 0).sum())
    0
    """
    expert = as_expert(expert)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InvalidArgumentError(f"scale must be a finite number, got {scale!r}")
    check_state(expert, state_dict, check_base)
    return add_expert(expert, state_dict, expert.names, scale, progress, restorable)


def on_gpu(w: torch.Tensor) -> bool:
    """Whether the GPU kernels add into this weight in place."""
    return w.device.type == "cuda" and w.is_contiguous() and w.dtype in ADD_MODES


def add_expert(expert: CompressedExpert, state_dict: MutableMapping[str, torch.Tensor], names: Sequence[str],
               scale: float, progress: bool = False, restorable: bool = False) -> Restore | None:
    """The body of :func:`apply` for tensors ``names`` (the caller has checked the base).

    Phase 1 reads every payload once and checks every chunk of those very bytes (the executors hold
    them); phase 2 writes from the same bytes, so a payload changed on disk in between cannot make
    a write fail halfway. Should a write fail anyway (memory), a ``restorable`` apply is undone
    before the error propagates."""
    by_device: dict[torch.device, list[str]] = {}
    for name in names:
        if on_gpu(state_dict[name]):
            by_device.setdefault(state_dict[name].device, []).append(name)
    on_host = [n for n in names if not on_gpu(state_dict[n])]
    # phase 1: read and verify everything before any write
    executors = [(expert.executor(None, on_host), on_host)]
    executors += [(expert.executor(device, group), group) for device, group in by_device.items()]
    cpu = executors[0][0]
    fallback = [n for n in on_host if not _in_place(state_dict[n].detach(), cpu.tensors[n].value is not None)]
    check_outputs([max(((n, output_bytes(expert.entry(n))) for n in fallback), key=lambda item: item[1],
                       default=("", 0))], expert.path)  # one decoded tensor at a time below
    undo = Restore(expert, state_dict) if restorable else None
    if undo is not None:
        undo.saved.append((None, {n: state_dict[n].detach().clone() for n in on_host}))
        for executor, group in executors[1:]:
            undo.saved.append((executor, executor.save_entries(state_dict, group)))
    try:  # phase 2: write
        _write(expert, state_dict, executors, fallback, scale, progress)
    except BaseException:
        if undo is not None:
            undo.restore()
        raise
    return undo


def _in_place(w: torch.Tensor, dense: bool) -> bool:
    """Whether the CPU kernels (or, for a tensor stored dense, a copy) write into ``w`` directly."""
    return dense or (w.device.type == "cpu" and w.dtype in ADD_MODES)


def _write(expert: CompressedExpert, state_dict: MutableMapping[str, torch.Tensor], executors: list[Any],
           fallback: list[str], scale: float, progress: bool) -> None:
    for executor, group in executors[1:]:
        executor.run([TensorPlan(n, ADD, state_dict[n], scale) for n in group])
    plans = []
    copies_back = []
    cpu, on_host = executors[0]
    for name in progress_bar(on_host, "applying", progress):
        w, held = state_dict[name].detach(), cpu.tensors[name]
        if name not in fallback:
            work = w if w.is_contiguous() or held.value is not None else w.contiguous()
            if work is not w:
                copies_back.append((w, work))
            plans.append(TensorPlan(name, ADD, work, scale))
        else:  # float64, a strided GPU weight or another device: the same rule on the kept positions only,
            # decoded from the bytes phase 1 read and checked (never read again)
            dense = allocate(expert.entry(name), held.shape, held.dtype, expert.path)
            cpu.run([TensorPlan(name, DECODE, dense)])
            dense = dense.to(w.device)
            w.copy_(torch.where(dense != 0, added(w, float(scale) * dense.float()), w))
    cpu.run(plans)
    for w, work in copies_back:
        w.copy_(work)
