"""Read OME-Zarr 0.5 pyramids for tile serving, with an LRU of decoded chunks.

A converted image (``<zarr_root>/<series>/<job>.zarr/<n>``, see
``processing/omezarr.py``) is immutable: the worker writes a new store for every
job, so everything read here can be cached without invalidation. Two caches:

* :class:`PyramidImage` objects (attributes, level shapes and open arrays), one per
  image path, so a tile request never re-reads ``zarr.json``;
* decoded chunks, in a byte-bounded LRU shared by all images. A request for any box
  of a level is answered from cached chunks; missing chunks are fetched with **one**
  zarr read of their bounding box (so a cold coronal tile, which touches one chunk
  per slice, is one call), then split into chunks for the cache. Neighbouring tiles,
  and the next coronal or sagittal slice, hit the cache.

The arrays are read with zarr-python (and the ``zarrs`` codec pipeline when it is
enabled in the process).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from core.errors import NotFoundError

__all__ = ["ChunkCache", "PyramidImage", "PyramidReader"]

logger = logging.getLogger(__name__)

#: Default chunk cache budget: 256 MiB of decoded samples per process.
DEFAULT_CACHE_BYTES: Final = 256 << 20


class ChunkCache:
    """A thread-safe LRU of decoded chunks, bounded by bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[Any, ...]) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple[Any, ...], value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


@dataclass(frozen=True, slots=True)
class PyramidImage:
    """One multiscale image as stored: what tile rendering needs to know.

    Attributes
    ----------
    path
        The image group's URL or path.
    axes
        Array axis names, e.g. ``("z", "y", "x")`` or ``("c", "y", "x")``.
    kind
        ``volume``, ``plane`` or ``cine``.
    shapes
        ``(z, y, x)`` of every level (``z`` = 1 for 2-D).
    spacings
        ``(z, y, x)`` voxel size (mm) of every level, from the OME ``scale``.
    chunks
        ``(z, y, x)`` chunk shape of every level.
    samples
        Samples per pixel (3 for RGB).
    dtype
        Stored dtype.
    attrs
        The ``pacslab`` attributes: UIDs, photometric interpretation, rescale,
        windows, direction cosines (``processing/omezarr.py``).
    """

    path: str
    axes: tuple[str, ...]
    kind: str
    shapes: tuple[tuple[int, int, int], ...]
    spacings: tuple[tuple[float, float, float], ...]
    chunks: tuple[tuple[int, int, int], ...]
    samples: int
    dtype: np.dtype[Any]
    attrs: dict[str, Any]
    arrays: tuple[Any, ...]

    @property
    def levels(self) -> int:
        return len(self.shapes)


def _zyx(values: Sequence[Any], axes: Sequence[str], default: Any) -> tuple[Any, Any, Any]:
    named = dict(zip(axes, values, strict=True))
    named.setdefault("z", named.get("t", default))
    return (named.get("z", default), named["y"], named["x"])


class PyramidReader:
    """Open images once and read level boxes through a :class:`ChunkCache`."""

    def __init__(self, cache: ChunkCache | None = None, *, max_images: int = 64) -> None:
        self.cache = cache or ChunkCache()
        self._images: OrderedDict[str, PyramidImage] = OrderedDict()
        self._max_images = max_images
        self._lock = threading.Lock()

    def open(self, path: str) -> PyramidImage:
        """The image at ``path`` (cached).

        Raises
        ------
        NotFoundError
            No OME-Zarr image there (deleted store, wrong path).
        """
        with self._lock:
            image = self._images.get(path)
            if image is not None:
                self._images.move_to_end(path)
                return image
        image = self._load(path)
        with self._lock:
            self._images[path] = image
            while len(self._images) > self._max_images:
                self._images.popitem(last=False)
        return image

    @staticmethod
    def _load(path: str) -> PyramidImage:
        import zarr

        _enable_zarrs()
        try:
            group = zarr.open_group(path, mode="r", zarr_format=3)
            attrs: dict[str, Any] = dict(group.attrs)
            ms: dict[str, Any] = attrs["ome"]["multiscales"][0]
            axes = tuple(a["name"] for a in ms["axes"])
            arrays = tuple(zarr.open_array(f"{path}/{d['path']}", mode="r", zarr_format=3)
                           for d in ms["datasets"])
        except (FileNotFoundError, KeyError, IndexError, zarr.errors.NodeNotFoundError
                ) as exc:
            raise NotFoundError("no pyramid image at the recorded path") from exc
        shapes: list[tuple[int, int, int]] = []
        spacings: list[tuple[float, float, float]] = []
        chunks: list[tuple[int, int, int]] = []
        for d, arr in zip(ms["datasets"], arrays, strict=True):
            scale = next(t["scale"] for t in d["coordinateTransformations"]
                         if t["type"] == "scale")
            z, y, x = _zyx(arr.shape, axes, 1)
            shapes.append((int(z), int(y), int(x)))
            sz, sy, sx = _zyx(scale, axes, 1.0)
            spacings.append((float(sz), float(sy), float(sx)))
            cz, cy, cx = _zyx(arr.chunks, axes, 1)
            chunks.append((int(cz), int(cy), int(cx)))
        samples = int(arrays[0].shape[axes.index("c")]) if "c" in axes else 1
        pacslab: dict[str, Any] = attrs.get("pacslab", {})
        return PyramidImage(path, axes, str(pacslab.get("kind", "plane")), tuple(shapes),
                            tuple(spacings), tuple(chunks), samples,
                            np.dtype(arrays[0].dtype), pacslab, arrays)

    def read(self, image: PyramidImage, level: int, box: Sequence[tuple[int, int]]
             ) -> np.ndarray:
        """Samples of ``box`` = ``((z0, z1), (y0, y1), (x0, x1))`` at ``level``.

        Returns ``(z, y, x)`` or ``(z, y, x, c)`` for colour, whatever the stored
        axis order.
        """
        shape = image.shapes[level]
        chunk = image.chunks[level]
        box = [(max(0, a), min(n, b)) for (a, b), n in zip(box, shape, strict=True)]
        ranges = [range(a // c, (b - 1) // c + 1) for (a, b), c in zip(box, chunk, strict=True)]
        out_shape: tuple[int, ...] = tuple(b - a for a, b in box)
        if image.samples > 1:
            out_shape += (image.samples,)
        out = np.empty(out_shape, dtype=image.dtype)
        keys = list(itertools.product(*ranges))
        found: dict[tuple[int, ...], np.ndarray] = {}
        missing = []
        for k in keys:
            item = self.cache.get((image.path, level, k))
            if item is None:
                missing.append(k)
            else:
                found[k] = item
        if missing:
            found.update(self._fetch(image, level, missing))
        for k, block in found.items():
            start = [i * c for i, c in zip(k, chunk, strict=True)]
            src, dst = [], []
            for (a, b), s, n in zip(box, start, block.shape[:3], strict=True):
                lo, hi = max(a, s), min(b, s + n)
                src.append(slice(lo - s, hi - s))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = block[tuple(src)]
        return out

    def _fetch(self, image: PyramidImage, level: int, keys: list[tuple[int, ...]]
               ) -> dict[tuple[int, ...], np.ndarray]:
        """Read the chunk-aligned bounding box of ``keys`` once; cache each chunk."""
        shape, chunk = image.shapes[level], image.chunks[level]
        lo = [min(k[i] for k in keys) for i in range(3)]
        hi = [max(k[i] for k in keys) + 1 for i in range(3)]
        bounds = [(a * c, min(b * c, n)) for a, b, c, n in zip(lo, hi, chunk, shape, strict=True)]
        sel: dict[str, slice] = {"z": slice(*bounds[0]), "t": slice(*bounds[0]),
                                 "y": slice(*bounds[1]), "x": slice(*bounds[2]),
                                 "c": slice(None)}
        data = np.asarray(image.arrays[level][tuple(sel[a] for a in image.axes)])
        data = _to_zyxc(data, image.axes)
        out = {}
        for k in keys:
            s = tuple(slice(i * c - b[0], min((i + 1) * c, n) - b[0])
                      for i, c, b, n in zip(k, chunk, bounds, shape, strict=True))
            block = np.ascontiguousarray(data[s])
            self.cache.put((image.path, level, k), block)
            out[k] = block
        return out


def _to_zyxc(data: np.ndarray, axes: Sequence[str]) -> np.ndarray:
    """Stored axis order → ``(z, y, x[, c])``; 2-D gets a length-1 ``z``."""
    names = list(axes)
    if "t" in names:
        names[names.index("t")] = "z"
    if "z" not in names:
        data = data[np.newaxis]
        names = ["z", *names]
    order = [names.index(a) for a in ("z", "y", "x")]
    if "c" in names:
        order.append(names.index("c"))
    return np.moveaxis(data, order, list(range(len(order))))


def _enable_zarrs() -> None:
    """Use the ``zarrs`` codec pipeline if importable (as ``processing.tiling`` does,
    and honouring the same ``PACSLAB_ZARRS=0`` switch); storage may not import
    processing."""
    import os

    import zarr

    if os.environ.get("PACSLAB_ZARRS", "1") == "0":
        return
    try:
        import zarrs  # noqa: F401
    except ImportError:
        return
    if zarr.config.get("codec_pipeline.path") != "zarrs.ZarrsCodecPipeline":
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
