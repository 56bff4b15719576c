"""The image pool: content-addressed image store with bad-file checks.

Every accepted image is copied to ``<images_dir>/<sha[:2]>/<sha256><ext>`` and keyed by the sha256
of its bytes, so the same picture ingested twice (under any name) is one pool entry. Rejected files
are recorded with a reason and never stop an ingest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from loop.config import IngestConfig
from loop.errors import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
_FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


@dataclass(frozen=True)
class PoolImage:
    """One pool entry. ``path`` is relative to the pool's images folder."""

    sha256: str
    path: str
    width: int
    height: int
    source: str


@dataclass(frozen=True)
class Rejected:
    source: str
    reason: str


@dataclass
class IngestReport:
    """``accepted`` maps every readable input path (new or duplicate) to its pool entry.
    ``label_problems``: label files that were not imported (unreadable, a bad line, ambiguous,
    conflicting with another name of the same image, or without an image), with the reason.
    ``dropped_regions``: regions of imported masks left out (too small), per mask file with the
    region's size, place and reason; the rest of the mask was imported."""

    added: list[PoolImage]
    duplicates: list[str]
    rejected: list[Rejected]
    accepted: dict[str, PoolImage]
    label_problems: list[Rejected] = field(default_factory=list)
    dropped_regions: list[Rejected] = field(default_factory=list)

    @property
    def summary(self) -> str:
        text = (
            f"{len(self.added)} added, {len(self.duplicates)} duplicates, "
            f"{len(self.rejected)} rejected"
        )
        if self.label_problems:
            text += f", {len(self.label_problems)} label files not imported"
        if self.dropped_regions:
            text += f", {len(self.dropped_regions)} mask regions dropped"
        return text


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_image(path: Path, limits: IngestConfig) -> tuple[int, int, str]:
    """Return ``(width, height, suffix)`` of a readable image or raise `ImageError` with the reason."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot stat: {exc}") from exc
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    if size > limits.max_bytes:
        raise ImageError(f"file too large ({size} bytes > {limits.max_bytes})")
    try:
        with warnings.catch_warnings():
            # Pillow only warns about decompression bombs below its hard limit; make it an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt = im.format or ""
                w, h = im.size
                if w * h > limits.max_pixels:
                    raise ImageError(f"image too large ({w}x{h} > {limits.max_pixels} pixels)")
                im.load()  # decodes everything: catches truncated files that verify() misses
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (format not recognised)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    if fmt not in _FORMAT_SUFFIX:
        raise ImageError(f"unsupported image format {fmt!r}")
    if min(w, h) < limits.min_side:
        raise ImageError(f"image too small ({w}x{h}; min side {limits.min_side})")
    return w, h, _FORMAT_SUFFIX[fmt]


def iter_image_files(root: Path) -> Iterator[Path]:
    """Files below ``root`` (or ``root`` itself), sorted, skipping hidden files. Non-images are
    yielded too so that ingest can report them."""
    if root.is_file():
        yield root
        return
    for p in sorted(root.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p


class ImagePool:
    """The set of ingested images, persisted as ``index_path`` (JSON) beside ``images_dir``."""

    def __init__(self, images_dir: Path, index_path: Path) -> None:
        self.images_dir = images_dir
        self.index_path = index_path
        self._images: dict[str, PoolImage] = {}
        self._rejected: list[Rejected] = []
        if index_path.exists():
            doc = json.loads(index_path.read_text())
            self._images = {k: PoolImage(**v) for k, v in doc.get("images", {}).items()}
            self._rejected = [Rejected(**r) for r in doc.get("rejected", [])]

    def __len__(self) -> int:
        return len(self._images)

    def __contains__(self, sha: object) -> bool:
        return sha in self._images

    def __iter__(self) -> Iterator[PoolImage]:
        return iter(sorted(self._images.values(), key=lambda p: p.sha256))

    def get(self, sha: str) -> PoolImage:
        try:
            return self._images[sha]
        except KeyError:
            raise ImageError(f"image {sha[:12]} is not in the pool; ingest it first") from None

    def abs_path(self, sha: str) -> Path:
        return self.images_dir / self.get(sha).path

    @property
    def rejected(self) -> list[Rejected]:
        return list(self._rejected)

    def ingest(
        self,
        files: Iterable[Path],
        limits: IngestConfig,
        on_progress: Callable[[Path], None] | None = None,
    ) -> IngestReport:
        """Copy acceptable images into the store. Never raises for a bad file: records why."""
        report = IngestReport(added=[], duplicates=[], rejected=[], accepted={})
        for path in files:
            if on_progress is not None:
                on_progress(path)
            try:
                w, h, suffix = check_image(path, limits)
            except ImageError as exc:
                rej = Rejected(str(path), str(exc))
                report.rejected.append(rej)
                self._rejected.append(rej)
                continue
            sha = sha256_file(path)
            if sha in self._images:
                report.duplicates.append(str(path))
                report.accepted[str(path)] = self._images[sha]
                continue
            rel = f"{sha[:2]}/{sha}{suffix}"
            dest = self.images_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp_name = _unique_tmp(dest, ".part")
            try:
                shutil.copyfile(path, tmp_name)
                os.replace(tmp_name, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise
            entry = PoolImage(sha, rel, w, h, str(path))
            self._images[sha] = entry
            report.added.append(entry)
            report.accepted[str(path)] = entry
        self.save()
        return report

    def record_rejected(self, rejected: Iterable[Rejected]) -> None:
        """Remember more skipped inputs (e.g. label files) for `status`; saved with `save`.
        An identical ``(source, reason)`` already recorded is not repeated."""
        seen = {(r.source, r.reason) for r in self._rejected}
        for r in rejected:
            if (r.source, r.reason) not in seen:
                self._rejected.append(r)
                seen.add((r.source, r.reason))

    def save(self) -> None:
        doc = {
            "updated_at": datetime.now(UTC).isoformat(),
            "images": {k: asdict(v) for k, v in sorted(self._images.items())},
            "rejected": [asdict(r) for r in self._rejected],
        }
        atomic_write_text(self.index_path, json.dumps(doc, indent=1))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old or the new file, never half of one.

    The text goes to a temporary file of a unique name in the same folder (so two writers never
    share one), is flushed to disk, and renamed over ``path``; a failure leaves no temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_tmp(path, ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _unique_tmp(path: Path, suffix: str) -> Path:
    """Create an empty, hidden temporary file beside ``path`` whose name no other writer (process
    or thread) can pick; created with the usual permissions (umask), unlike `tempfile.mkstemp`."""
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
