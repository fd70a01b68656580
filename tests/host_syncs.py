"""Counting what a piece of torch code reads from the device to the host, on the CPU.

On CUDA each of these stalls the CPU until the GPU's queue drains. A CPU run performs the same ops, so counting them
here says how often a GPU step would wait, without a GPU: scalar reads (`.item()`, `float(t)`, `bool(t)`, `if t:`),
ops whose output size depends on the values (`nonzero`, boolean-mask indexing, `masked_select`, `unique`), and
whole-tensor reads to Python (`tolist`, `numpy`).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops that need a device value on the host before they can return.
_READS = {
    _aten._local_scalar_dense.default,
    _aten.is_nonzero.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.repeat_interleave.Tensor,
}
_INDEXING = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default}


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READS or (func in _INDEXING and _bool_index(args)):
            self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    """tolist / numpy read the whole tensor without dispatching an op."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy"):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


class HostSyncs:
    """`with HostSyncs() as s: ...` then `s.total` and `s.counts` (op name -> times)."""

    def __enter__(self) -> "HostSyncs":
        self.counts: Counter = Counter()
        self._modes = [_Function(self.counts), _Dispatch(self.counts)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())
