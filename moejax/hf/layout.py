"""How one moejax array is laid out in Hugging Face tensors: :class:`TensorMap`.

A Hugging Face tensor is a moejax array with some axes flattened together and the axes reordered. ``nn.Linear``
weights are ``[out, in]``; moejax kernels are ``[in, out]`` with heads as their own axis: ``q_proj.weight``
[H*Dh, D] is ``query/kernel`` [D, H, Dh] with HF axis 0 = moejax axes (1, 2) and HF axis 1 = moejax axis 0. A
stacked expert array [E, ...] is E tensors, one per expert, each laid out the same way.

The same description converts both ways and reads any block of the moejax array from the files without reading
more than the block's bounding box of each HF tensor (and only the experts of the block), which is what placing
a sharded array needs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

Index = tuple[slice, ...]
ReadFn = Callable[[str, tuple[slice, ...]], np.ndarray]
"""``read(hf_name, hf_slices) -> np.ndarray`` of that box of the named tensor."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One moejax array and the HF tensor(s) holding it.

    Attributes:
      path: the array's path in the variables, collection first: ``('params', 'decoder', 'block_0', 'attn',
        'query', 'kernel')`` or ``('moe_state', ..., 'selection_bias')``.
      hf: the HF tensor name; for stacked experts a template with ``{e}`` for the expert number.
      shape: the moejax shape of one tensor's part (without the expert axis).
      axes: for each HF axis, in HF order, the moejax axes (indices into ``shape``) flattened into it, slowest
        first: ``((1, 2), (0,))`` for ``q_proj``. Every moejax axis appears once.
      experts: ``E`` for a stacked array ``[E, *shape]`` (one HF tensor per expert), else None.
    """

    path: tuple[str, ...]
    hf: str
    shape: tuple[int, ...]
    axes: tuple[tuple[int, ...], ...]
    experts: int | None = None

    def __post_init__(self) -> None:
        flat = sorted(a for group in self.axes for a in group)
        if flat != list(range(len(self.shape))):
            raise ValueError(f"TensorMap {'/'.join(self.path)}: axes {self.axes} must use each of the "
                             f"{len(self.shape)} axes of shape {self.shape} once")

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The moejax shape: ``[E, *shape]`` for stacked experts."""
        return self.shape if self.experts is None else (self.experts, *self.shape)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of each HF tensor."""
        return tuple(math.prod(self.shape[a] for a in group) for group in self.axes)

    @property
    def hf_names(self) -> tuple[str, ...]:
        """Every HF tensor name this array uses (E names for stacked experts)."""
        if self.experts is None:
            return (self.hf,)
        return tuple(self.hf.format(e=e) for e in range(self.experts))

    @property
    def _order(self) -> tuple[int, ...]:
        return tuple(a for group in self.axes for a in group)

    def to_moejax(self, tensor: np.ndarray) -> np.ndarray:
        """One HF tensor (full, ``hf_shape``) -> its moejax array ``shape``."""
        order = self._order
        return tensor.reshape([self.shape[a] for a in order]).transpose(np.argsort(order))

    def to_hf(self, array: np.ndarray) -> dict[str, np.ndarray]:
        """The moejax array (``full_shape``) -> ``{hf name: tensor}`` (one per expert when stacked)."""
        if self.experts is None:
            return {self.hf: self.to_hf_one(array)}
        return {name: self.to_hf_one(array[e]) for e, name in enumerate(self.hf_names)}

    def to_hf_one(self, array: np.ndarray) -> np.ndarray:
        """One moejax array ``shape`` (one expert's part when stacked) -> its HF tensor ``hf_shape``."""
        return np.ascontiguousarray(np.asarray(array).transpose(self._order).reshape(self.hf_shape))

    def read(self, read: ReadFn, index: Index | None = None) -> np.ndarray:
        """The block ``index`` (slices over ``full_shape``, None = all) of the moejax array, read from the files.

        Stacked experts: only the tensors of the experts in the block are read. Each HF axis is read over the
        bounding range of the flat positions the block covers (contiguous whenever only the slowest moejax axis
        of that HF axis is partial, the usual case of a sharded ``heads`` or ``embed`` axis)."""
        full = self.full_shape
        index = tuple(slice(None) for _ in full) if index is None else tuple(index)
        ranges = [range(*s.indices(n)) for s, n in zip(index, full)]
        if self.experts is None:
            return self._read_one(read, self.hf, ranges)
        return np.stack([self._read_one(read, self.hf.format(e=e), ranges[1:]) for e in ranges[0]])

    def _read_one(self, read: ReadFn, name: str, ranges: list[range]) -> np.ndarray:
        boxes, picks = [], []
        for group in self.axes:
            sizes = [self.shape[a] for a in group]
            grid = np.ix_(*[np.asarray(ranges[a]) for a in group])
            flat = np.ravel_multi_index(grid, sizes).reshape(-1)
            lo, hi = int(flat.min()), int(flat.max()) + 1
            boxes.append(slice(lo, hi))
            picks.append(None if hi - lo == flat.size and np.all(np.diff(flat) == 1) else flat - lo)
        block = read(name, tuple(boxes))
        for axis, pick in enumerate(picks):
            if pick is not None:
                block = np.take(block, pick, axis=axis)
        order = self._order
        return block.reshape([len(ranges[a]) for a in order]).transpose(np.argsort(order))


def linear(path: tuple[str, ...], hf: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
           experts: int | None = None) -> TensorMap:
    """An ``nn.Linear`` weight [prod(out), prod(in)] as a moejax kernel ``[*in_shape, *out_shape]``."""
    n_in = len(in_shape)
    shape = (*in_shape, *out_shape)
    return TensorMap(path, hf, shape, (tuple(range(n_in, len(shape))), tuple(range(n_in))), experts)


def vector(path: tuple[str, ...], hf: str, shape: tuple[int, ...]) -> TensorMap:
    """A 1-D HF tensor (norm weight, bias) as a moejax array of ``shape`` (its axes flattened in order)."""
    return TensorMap(path, hf, shape, (tuple(range(len(shape))),))


def same(path: tuple[str, ...], hf: str, shape: tuple[int, ...]) -> TensorMap:
    """A tensor stored with the same shape and axis order in both (e.g. the token embedding [V, D])."""
    return TensorMap(path, hf, shape, tuple((a,) for a in range(len(shape))))
