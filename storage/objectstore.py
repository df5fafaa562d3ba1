"""Content-addressed originals in object storage (S3 and anything else fsspec opens).

Same keys and layout as :class:`storage.originals.FileOriginalStore`
(``<prefix>/ab/cd/<sha256>.dcm``). Received files are still staged on local disk
(``staging_dir``); :meth:`ObjectOriginalStore.commit` uploads the staged file and then
deletes it. The original is durable when the PUT returned: an S3 PUT is atomic and
acknowledged only once stored, so nothing is acknowledged to a modality before that.
Two receivers committing the same key upload identical bytes (the key is the content
hash), so the race is harmless.

Decoders need files: :meth:`ObjectOriginalStore.path` materialises a local copy in a
cache directory (content-addressed, so a cached copy is never stale).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO, cast

from core.errors import NotFoundError, OutOfResourcesError

__all__ = ["ObjectOriginalStore"]

logger = logging.getLogger(__name__)


def _check_key(key: str) -> str:
    if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
        raise NotFoundError("not a content key")
    return key


class ObjectOriginalStore:
    """:class:`storage.abc.OriginalStore` on an fsspec URL such as ``s3://bucket/originals``.

    Parameters
    ----------
    url
        Where originals live; any URL fsspec understands (``s3://``, ``memory://``…).
    staging
        Local directory for files being received.
    cache
        Local directory for copies handed to decoders by :meth:`path`
        (default: ``<staging>/../.cache``).
    storage_options
        Passed to fsspec (for S3: ``endpoint_url``, ``key``, ``secret``…).
    """

    def __init__(
        self,
        url: str,
        *,
        staging: Path,
        cache: Path | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        self.fs, root = url_to_fs(self.url, **dict(storage_options or {}))
        self.root = str(root).rstrip("/")
        self._staging = staging
        self._staging.mkdir(parents=True, exist_ok=True)
        self._cache = cache or staging.parent / ".cache"

    @property
    def has_local_paths(self) -> bool:
        return False

    def staging_dir(self) -> Path:
        return self._staging

    def _remote(self, key: str) -> str:
        _check_key(key)
        return f"{self.root}/{key[:2]}/{key[2:4]}/{key}.dcm"

    def commit(self, staged: Path, key: str, *, defer_sync: bool = False) -> bool:
        """Upload ``staged`` under ``key`` and delete it; False if the key existed.

        Raises
        ------
        OutOfResourcesError
            The object store refused or could not be reached (C-STORE 0xA700).
        """
        remote = self._remote(key)
        try:
            if self.fs.exists(remote):
                return False
            self.fs.put_file(str(staged), remote)
        except Exception as exc:
            # fsspec backends raise their own types (botocore's connection errors are
            # not OSErrors); whatever it is, the original is not stored.
            logger.error("upload of an original failed: %s", type(exc).__name__)
            raise OutOfResourcesError("original store unavailable") from exc
        finally:
            with contextlib.suppress(OSError):
                staged.unlink(missing_ok=True)
        return True

    def sync(self) -> None:
        """Nothing to do: an object is durable once its PUT succeeded."""

    def path(self, key: str) -> Path:
        """A local copy of the original (downloaded once into the cache)."""
        local = self._cache / key[:2] / key[2:4] / f"{_check_key(key)}.dcm"
        if local.exists():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f"{local.name}.{uuid.uuid4().hex}.part")
        try:
            self.fs.get_file(self._remote(key), str(part))
            os.replace(part, local)
        except FileNotFoundError as exc:
            raise NotFoundError("original missing") from exc
        finally:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
        return local

    def open(self, key: str) -> BinaryIO:
        try:
            return cast(BinaryIO, self.fs.open(self._remote(key), "rb"))
        except FileNotFoundError as exc:
            raise NotFoundError("original missing") from exc

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._remote(key)))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._remote(key))
        local = self._cache / key[:2] / key[2:4] / f"{key}.dcm"
        local.unlink(missing_ok=True)
