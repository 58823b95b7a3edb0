"""Site layouts: every level and image of a pyramid packed into one row space, for maps and voxels alike.

A *site* is a pixel (voxel) where a level holds a feature: every pixel of a feature map, or the active
voxels of a sparse volume. A router runs on the sites of all levels and images of its input at once,
as rows of one tensor: :class:`SiteRows` holds the features, ``(R + 1, C)``, ordered level-major (then,
for maps, image and row-major pixel order; for voxels, the input's row order), with one zero row at the
end that every gather of a missing neighbour reads.

A :class:`SiteLayout` describes the rows, built once per input shape (maps: cached) or per input (voxels)
and shared by every router of a tower:

- ``segment`` (R,): ``level * N + image``; normalisation statistics and coarse gates are per segment.
- ``neighbours`` (R, 3^ndim): the row each 3^ndim kernel tap reads inside the row's own level and image,
  in the order of torch's conv weights; ``R`` (the zero row) where the neighbour is outside the level or
  not a site.
- ``down`` / ``up``: resampling tables from each row to the rows of the next coarser / finer level it
  contributes to (see :mod:`sparsehead.layers.resample`): ``(index (R, F), weight (R, F))``, weight 0
  where there is no target (and on the levels without that neighbour).
- ``grid``: True when each level's rows are whole (N, *shape) maps, so dense kernels (convs over a level's
  map) may run on views of the rows.

Rows that are not sites (batch padding, see ``valid``) have zero features and zero gates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F

from .resample import RESAMPLE_MODES, grid_tables
from .sparse import from_rows, to_rows

__all__ = ["SiteLayout", "SiteRows", "map_layout", "index_layout", "kernel_offsets"]

T = TypeVar("T")


def kernel_offsets(ndim: int, kernel_size: int = 3) -> torch.Tensor:
    """Offsets (K, ndim) int64 of a kernel_size^ndim kernel, in the order torch's weights use."""
    r = kernel_size // 2
    axes = [torch.arange(-r, r + 1)] * ndim
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, ndim)


@dataclass(eq=False)
class SiteLayout:
    """The packed row space of a pyramid; see the module docstring.

    Attributes:
        ndim: spatial dimensions.
        batch: images ``N``.
        shapes: spatial shape of each level, finest first.
        offsets: first row of each level, and ``R`` last (``len(shapes) + 1`` entries).
        segment: (R,) int64, ``level * N + image``.
        image: (R,) int64.
        neighbours: (R, 3^ndim) int64, ``R`` where missing.
        down, up: resampling tables (index (R, F), weight (R, F)).
        coords: (R, ndim) int32 spatial coordinates of each row in its level.
        grid: rows are whole maps per level.
        valid: (R,) bool, the rows that are sites; None when all are.
        resample: the resampling the tables implement (``pool`` or ``bilinear``).
    """

    ndim: int
    batch: int
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    segment: torch.Tensor
    image: torch.Tensor
    neighbours: torch.Tensor
    down: tuple[torch.Tensor, torch.Tensor]
    up: tuple[torch.Tensor, torch.Tensor]
    coords: torch.Tensor
    grid: bool
    valid: torch.Tensor | None = None
    resample: str = "pool"
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        """``R``: rows of all levels (the zero row not included)."""
        return self.offsets[-1]

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    @property
    def num_segments(self) -> int:
        return self.num_levels * self.batch

    @property
    def device(self) -> torch.device:
        return self.segment.device

    def cached(self, key: tuple, build: Callable[[], T]) -> T:
        """``build()`` once per ``key`` for this layout: tables derived from it, kept as long as it is."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def level_rows(self, first: int, last: int) -> tuple[int, int]:
        """Row range ``[a, b)`` of levels ``first`` .. ``last - 1``."""
        return self.offsets[first], self.offsets[last]

    def level_mask(self, first: int, last: int, dtype: torch.dtype) -> torch.Tensor:
        """(R, 1) ``dtype``: 1 at the sites of levels ``first`` .. ``last - 1``, else 0 (cached)."""

        def build() -> torch.Tensor:
            m = torch.zeros(self.rows, 1, dtype=dtype, device=self.device)
            a, b = self.level_rows(first, last)
            m[a:b] = 1
            if self.valid is not None:
                m *= self.valid[:, None].to(dtype)
            return m

        return self.cached(("level_mask", first, last, dtype), build)

    def arange(self, first: int, last: int) -> torch.Tensor:
        """(M,) int64: the rows of levels ``first`` .. ``last - 1`` (cached)."""
        return self.cached(("arange", first, last), lambda: torch.arange(*self.level_rows(first, last),
                                                                          device=self.device))

    def site_count(self, first: int, last: int) -> int:
        """Sites of levels ``first`` .. ``last - 1`` in all images (cached; read from the device once)."""
        a, b = self.level_rows(first, last)
        return self.cached(("site_count", first, last),
                           lambda: b - a if self.valid is None else int(self.valid[a:b].sum()))

    def tap_index(self, columns: int, groups: int) -> torch.Tensor:
        """(R, groups, K) flat positions into a (R + 1, columns * K) tensor of per-tap products: entry
        ``[r, j, t]`` is tap ``t`` of column group ``j`` at the neighbour ``t`` of row ``r`` (cached)."""
        k = self.neighbours.shape[1]
        return self.cached(("tap_index", columns, groups), lambda: self.neighbours[:, None, :] * (columns * k)
                           + torch.arange(groups * k, device=self.device).view(1, groups, k))

    def gate_conv(self, taps: torch.Tensor, groups: int, bias: torch.Tensor | None) -> torch.Tensor:
        """A gate conv from per-tap products ``taps`` (R + 1, columns * K) (:func:`~sparsehead.layers.gates.
        rows_taps` of the rows; the zero row's are zero): the first ``groups`` column groups' taps read at
        each row's neighbours and summed, plus ``bias``: (R, groups)."""
        k = self.neighbours.shape[1]
        out = torch.take(taps, self.tap_index(taps.shape[1] // k, groups)).sum(dim=2)
        return out if bias is None else out + bias

    def neighbour_max(self, values: torch.Tensor) -> torch.Tensor:
        """Max of ``values`` (R, G) >= 0 over each row's 3^ndim neighbours (0 where missing): (R, G)."""
        return F.pad(values, (0, 0, 0, 1))[self.neighbours].amax(dim=1)

    def onehot(self, dtype: torch.dtype, sites_only: bool = False) -> torch.Tensor:
        """(R, S) ``dtype``: each row's segment, one-hot (cached); ``sites_only``: zero rows off the sites.
        Segment sums are ``onehot.t() @ values`` and per-segment values back on rows ``onehot @ table``."""

        def build() -> torch.Tensor:
            oh = F.one_hot(self.segment, self.num_segments).to(dtype)
            return oh * self.valid[:, None].to(dtype) if sites_only and self.valid is not None else oh

        return self.cached(("onehot", dtype, sites_only), build)

    def level_onehot(self, dtype: torch.dtype) -> torch.Tensor:
        """(R, L) ``dtype``: each row's level, one-hot (cached); per-level sums are ``values @ level_onehot``
        for values (X, R)."""
        return self.cached(("level_onehot", dtype), lambda: F.one_hot(
            torch.div(self.segment, self.batch, rounding_mode="floor"), self.num_levels).to(dtype))

    def local_rows(self) -> torch.Tensor:
        """(R,) int64: each row's number within its level (cached)."""

        def build() -> torch.Tensor:
            start = torch.tensor(self.offsets[:-1], device=self.device)
            return torch.arange(self.rows, device=self.device) - start.repeat_interleave(
                torch.tensor(self.offsets[1:], device=self.device) - start, output_size=self.rows)

        return self.cached(("local_rows",), build)

    def table(self, direction: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``down`` or ``up`` resampling table with its weights in ``dtype`` (cached)."""
        index, weight = getattr(self, direction)
        return self.cached(("table", direction, dtype), lambda: (index, weight.to(dtype)))

    def per_level_image(self, values: torch.Tensor) -> torch.Tensor:
        """Sums (L, N, X) over the sites of each level and image of per-row ``values`` (R, X)."""
        sums = self.onehot(values.dtype, sites_only=True).t() @ values  # (S, X): level-major segments
        return sums.view(self.num_levels, self.batch, -1)

    def sites_per_level_image(self) -> torch.Tensor:
        """(L, N) float32: sites of each level in each image (cached)."""
        return self.cached(("sites_per_level_image",),
                           lambda: self.per_level_image(torch.ones(self.rows, 1, device=self.device))[:, :, 0])

    def segment_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Each row replaced by the mean of ``values`` (R, G) over the sites of its segment: (R, G)."""
        oh = self.onehot(values.dtype, sites_only=True)
        sums = oh.t() @ values
        return self.onehot(values.dtype) @ (sums / oh.sum(dim=0).clamp_min(1.0)[:, None])

    def pack_levels(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Rows (R, X) from per-level dense tensors (N, X, *shape_l), read at each level's rows."""
        out = []
        for lvl, v in enumerate(values):
            rows = to_rows(v)
            if not self.grid:
                a, b = self.level_rows(lvl, lvl + 1)
                pix = _flat(self.image[a:b], self.coords[a:b], self.shapes[lvl])
                rows = rows.index_select(0, pix)
            out.append(rows)
        return torch.cat(out)

    def level(self, rows: torch.Tensor, lvl: int) -> torch.Tensor:
        """Level ``lvl`` of rows (R or R + 1, X): a channels-last (N, X, *shape) view when :attr:`grid`,
        else the level's rows (R_l, X)."""
        a, b = self.level_rows(lvl, lvl + 1)
        part = rows[a:b]
        if not self.grid:
            return part
        return from_rows(part, (self.batch, rows.shape[1], *self.shapes[lvl]))


def _flat(image: torch.Tensor, coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Flat index (R,) int64 of (image, coords) in a row-major (N, *shape) grid."""
    flat = image.long()
    for d, s in enumerate(shape):
        flat = flat * s + coords[:, d].long()
    return flat


class SiteRows:
    """Features on a :class:`SiteLayout`: ``buf`` (R + 1, C), the last row zero.

    ``features`` is the (R, C) view without the zero row. :meth:`from_maps` / :meth:`to_maps` convert
    a pyramid of (N, C, *spatial) maps (copying in; views out).
    """

    __slots__ = ("buf", "layout")

    def __init__(self, buf: torch.Tensor, layout: SiteLayout) -> None:
        if buf.dim() != 2 or buf.shape[0] != layout.rows + 1:
            raise ValueError(f"SiteRows needs ({layout.rows + 1}, C) rows, got {tuple(buf.shape)}")
        self.buf = buf
        self.layout = layout

    @property
    def features(self) -> torch.Tensor:
        return self.buf[: self.layout.rows]

    @property
    def channels(self) -> int:
        return self.buf.shape[1]

    @classmethod
    def from_maps(cls, maps: Sequence[torch.Tensor], resample: str = "pool",
                  valid_sizes: Sequence[Sequence[int]] | None = None) -> SiteRows:
        """Pack maps (N, C, *spatial_l), finest first, into new rows. ``valid_sizes``: each image's size
        at the finest level (the rest is batch padding, not sites; see :func:`map_layout`)."""
        first = maps[0]
        n, c = first.shape[:2]
        layout = map_layout(n, [tuple(m.shape[2:]) for m in maps], first.device, resample, valid_sizes)
        buf = first.new_empty(layout.rows + 1, c)
        for lvl, m in enumerate(maps):
            a, b = layout.level_rows(lvl, lvl + 1)
            from_rows(buf[a:b], m.shape).copy_(m)
        buf[-1].zero_()
        if layout.valid is not None:
            buf[:-1].mul_(layout.valid[:, None].to(buf.dtype))
        return cls(buf, layout)

    def to_maps(self) -> list[torch.Tensor]:
        """The levels as channels-last (N, C, *spatial) views of the rows (grid layouts only)."""
        if not self.layout.grid:
            raise ValueError("to_maps needs a layout of whole maps (grid); these rows hold voxels")
        return [self.layout.level(self.buf, lvl) for lvl in range(self.layout.num_levels)]


# ------------------------------------------------------------------------------------------ map layouts

_MAP_LAYOUTS: dict[tuple, SiteLayout] = {}
_MAX_CACHED = 64


def map_layout(
    batch: int, shapes: Sequence[Sequence[int]], device: torch.device | str, resample: str = "pool",
    valid_sizes: Sequence[Sequence[int]] | None = None,
) -> SiteLayout:
    """The layout of whole maps of ``shapes`` (per level, finest first) for ``batch`` images (cached).

    ``valid_sizes``: per image, its size at the finest level; at coarser levels the valid size is halved,
    rounding up, like the levels. Pixels outside are padding: not sites.
    """
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
    device = torch.device(device)
    valid = None if valid_sizes is None else tuple(tuple(int(s) for s in v) for v in valid_sizes)
    key = (batch, shapes, str(device), resample, valid)
    layout = _MAP_LAYOUTS.get(key)
    if layout is None:
        if len(_MAP_LAYOUTS) >= _MAX_CACHED:
            _MAP_LAYOUTS.pop(next(iter(_MAP_LAYOUTS)))
        layout = _MAP_LAYOUTS[key] = _build_map_layout(batch, shapes, device, resample, valid)
    return layout


def _build_map_layout(batch, shapes, device, resample, valid_sizes) -> SiteLayout:
    ndim = len(shapes[0])
    sizes = [batch * math.prod(s) for s in shapes]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    total = offsets[-1]
    images, segments, nbrs, coords = [], [], [], []
    offs = kernel_offsets(ndim)
    for lvl, shape in enumerate(shapes):
        pix = math.prod(shape)
        img = torch.arange(batch, device=device).repeat_interleave(pix)
        images.append(img)
        segments.append(img + lvl * batch)
        rows = torch.arange(offsets[lvl], offsets[lvl + 1], device=device).view(batch, *shape)
        padded = F.pad(rows, (1, 1) * ndim, value=total)
        taps = []
        for o in offs.tolist():
            index = (slice(None),) + tuple(slice(1 + d, 1 + d + s) for d, s in zip(o, shape))
            taps.append(padded[index].reshape(-1))
        nbrs.append(torch.stack(taps, dim=1))
        grid = torch.stack(torch.meshgrid(*[torch.arange(s, device=device) for s in shape], indexing="ij"), -1)
        coords.append(grid.reshape(1, pix, ndim).expand(batch, -1, -1).reshape(-1, ndim))
    valid = None
    if valid_sizes is not None:
        if len(valid_sizes) != batch:
            raise ValueError(f"valid_sizes has {len(valid_sizes)} entries for a batch of {batch}")
        valid = _valid_rows(shapes, valid_sizes, device)
    down, up = grid_tables(batch, shapes, offsets, resample, device)
    layout = SiteLayout(
        ndim=ndim, batch=batch, shapes=shapes, offsets=tuple(offsets), segment=torch.cat(segments),
        image=torch.cat(images), neighbours=torch.cat(nbrs), down=down, up=up,
        coords=torch.cat(coords).int(), grid=True, valid=valid, resample=resample,
    )
    if valid is not None:
        _drop_invalid_targets(layout)
    return layout


def _valid_rows(shapes, valid_sizes, device) -> torch.Tensor:
    out = []
    for lvl, shape in enumerate(shapes):
        masks = []
        for size in valid_sizes:
            size = list(size)
            for _ in range(lvl):
                size = [(s + 1) // 2 for s in size]
            m = torch.zeros(shape, dtype=torch.bool, device=device)
            m[tuple(slice(0, min(s, t)) for s, t in zip(size, shape))] = True
            masks.append(m.reshape(-1))
        out.append(torch.cat(masks))
    return torch.cat(out)


def _drop_invalid_targets(layout: SiteLayout) -> None:
    """Neighbours that are not sites, and every neighbour of a row that is not, become missing (they read
    zeros); resampling sends nothing to or from rows that are not sites."""
    valid = torch.cat([layout.valid, layout.valid.new_zeros(1)])
    nbr = layout.neighbours
    layout.neighbours = nbr.masked_fill(~valid[nbr] | ~layout.valid[:, None], layout.rows)
    for name in ("down", "up"):
        index, weight = getattr(layout, name)
        weight = weight * valid[index].to(weight.dtype) * layout.valid[:, None].to(weight.dtype)
        setattr(layout, name, (index, weight))


# ---------------------------------------------------------------------------------------- voxel layouts


class _Lookup:
    """Rows of one level's index set by (image, coords), through its sorted flat keys."""

    def __init__(self, image: torch.Tensor, coords: torch.Tensor, shape: Sequence[int], offset: int,
                 missing: int) -> None:
        self.shape = [int(s) for s in shape]
        self.offset = offset
        self.missing = missing
        self.keys, self.order = torch.sort(_flat(image, coords, self.shape))

    def __call__(self, image: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """Global rows (..) of the sites at ``coords`` (.., ndim) of ``image`` (..); ``missing`` if none."""
        size = torch.tensor(self.shape, device=coords.device)
        inside = ((coords >= 0) & (coords < size)).all(dim=-1)
        flat = image.long()
        for d, s in enumerate(self.shape):
            flat = flat * s + coords[..., d].clamp(0, s - 1)
        if self.keys.numel() == 0:
            return torch.full_like(flat, self.missing)
        pos = torch.searchsorted(self.keys, flat).clamp_max(self.keys.numel() - 1)
        found = inside & (self.keys[pos] == flat)
        return torch.where(found, self.order[pos] + self.offset, torch.full_like(pos, self.missing))


def index_layout(
    indices: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]], batch: int, resample: str = "pool"
) -> SiteLayout:
    """The layout of sparse levels: ``indices[l]`` (R_l, 1 + ndim) int (image, coords), spconv's format.

    Rows keep each level's input order. Built per input (the index sets are data).
    """
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {resample!r}")
    from .resample import index_tables

    shapes = tuple(tuple(int(s) for s in shape) for shape in shapes)
    ndim = len(shapes[0])
    device = indices[0].device
    offsets = [0]
    for idx in indices:
        offsets.append(offsets[-1] + idx.shape[0])
    total = offsets[-1]
    images = [idx[:, 0].long() for idx in indices]
    coords = [idx[:, 1:].long() for idx in indices]
    lookups = [_Lookup(i, c, s, o, total) for i, c, s, o in zip(images, coords, shapes, offsets)]
    offs = kernel_offsets(ndim).to(device)
    nbrs = [lk(i[:, None].expand(-1, offs.shape[0]), c[:, None, :] + offs) for lk, i, c in zip(lookups, images, coords)]
    segments = [i + lvl * batch for lvl, i in enumerate(images)]
    down, up = index_tables(images, coords, shapes, lookups, offsets, resample)
    return SiteLayout(
        ndim=ndim, batch=batch, shapes=shapes, offsets=tuple(offsets), segment=torch.cat(segments),
        image=torch.cat(images), neighbours=torch.cat(nbrs), down=down, up=up,
        coords=torch.cat(coords).int(), grid=False, valid=None, resample=resample,
    )
