"""The per-folder index: what a start needs to know about a folder of training images, without
opening each image and each cache file again.

For every image it records the file's size and mtime, its size in pixels (the bucket input), and
what its caches held when they were last read: the feature cache's stat, encoder id and vector,
and each valid latent cache's stat, bucket, crop and VAE id. A start checks these records against
one `os.scandir` pass over the images and one stat per cache file, and opens only what changed: an
edited image is read again and its caches with it, a rewritten or deleted cache is noticed by its
stat. Nothing is trusted that the stats do not vouch for.

The feature vectors of the folder sit in the index file as one array, memory-mapped: the processes
of a node share one copy through the page cache.

The file, `.pfg_index.bin` beside the images (in a subset's `cache_dir`:
`.pfg_index-<folder>-<hash of its path>.bin`), is written atomically by the main process; a damaged
file (wrong checksum, truncated) or a foreign one (another format version, another folder) is
rebuilt with a message, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from library.data.images import IMAGE_EXTENSIONS, ImageLoadError, image_size
from library.fileio import WriteFailed, atomic_path, is_stale_temporary

MAGIC = b"PFGINDEX"
VERSION = 1
INDEX_NAME = ".pfg_index.bin"  # hidden, beside the caches: machinery, not data
_PREFIX = 8 + 4 + 4 + 8  # magic, version, crc32 of the body, body length
_ALIGN = 64
_NO_STAT = (-1, -1)
CURRENT, FINITE = 1, 2  # feature flags: made from the image as it is; no NaN/inf

LATENT_RECORD = np.dtype([("row", "<i4"), ("bucket", "<i4", 2), ("crop", "<i4", 4), ("vae", "<i2"), ("flipped", "u1"),
                          ("size", "<i8"), ("mtime", "<i8")])


class DamagedIndex(Exception):
    """An index file that cannot be used; the reason is one phrase for the message."""


class ScannedImage(NamedTuple):
    path: Path
    size: tuple[int, int] | None  # (width, height) after EXIF rotation; None when unreadable
    failure: ImageLoadError | None


class FeatureRecord(NamedTuple):
    """What a feature cache held when it was read (its vector: FolderIndex.vector_source)."""

    encoder_id: str
    current: bool  # made from the image as it is now
    finite: bool


def index_path(image_dir: Path, cache_dir: Path | None) -> Path:
    if cache_dir is None:
        return image_dir / INDEX_NAME
    digest = hashlib.sha1(str(image_dir).encode("utf-8")).hexdigest()[:8]
    return cache_dir / f".pfg_index-{image_dir.name}-{digest}.bin"


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


class FolderIndex:
    """One image folder and the cache folder its subset uses."""

    def __init__(self, image_dir: Path, cache_dir: Path | None, main: bool, say: Callable[[str], None]):
        self.image_dir = Path(image_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.path = index_path(self.image_dir, self.cache_dir)
        self.main = main  # writes the file and speaks; other processes only read
        self.say = say
        self._dirty = False
        self._scan: list[ScannedImage] | None = None
        self._load()

    # -- the file ---------------------------------------------------------------------------

    def _empty(self) -> None:
        self.names: list[str] = []
        self.row_of: dict[str, int] = {}
        self.stats = np.zeros((0, 2), np.int64)
        self.dims = np.zeros((0, 2), np.int32)
        self.feature_stats = np.zeros((0, 2), np.int64)
        self.feature_encoder = np.zeros(0, np.int16)
        self.feature_flags = np.zeros(0, np.uint8)
        self.vector_row = np.zeros(0, np.int32)
        self.encoders: list[str] = []
        self.vae_ids: list[str] = []
        self.vectors: np.ndarray | None = None  # the file's vectors, memory-mapped
        self.fresh: dict[int, np.ndarray] = {}  # row -> vector read since the file was written
        self.latents: dict[int, dict[tuple[int, int], tuple]] = {}  # row -> bucket -> (crop, vae, flipped, size, mtime)

    def _load(self) -> None:
        self._empty()
        if not self.path.is_file():
            return
        try:
            self._read()
        except OSError as e:
            self._read_failed(DamagedIndex(f"cannot be read ({e.strerror or e})"))
        except DamagedIndex as e:
            self._read_failed(e)

    def _read_failed(self, e: DamagedIndex) -> None:
        self._empty()
        self._dirty = True
        if self.main:
            self.say(f"index {self.path} {e}; rebuilding it (every file of the folder is read once)")

    def _read(self) -> None:
        with open(self.path, "rb") as f:
            prefix = f.read(_PREFIX)
            if len(prefix) < _PREFIX or prefix[:8] != MAGIC:
                raise DamagedIndex("is not a PFG index (damaged or foreign)")
            version, crc, length = int.from_bytes(prefix[8:12], "little"), int.from_bytes(prefix[12:16], "little"), int.from_bytes(prefix[16:24], "little")
            if version != VERSION:
                raise DamagedIndex(f"has format version {version}, this code writes {VERSION}")
            header_length = int.from_bytes(f.read(8), "little")
            head = f.read(header_length)
            check = zlib.crc32(header_length.to_bytes(8, "little"))
            check = zlib.crc32(head, check)
            try:
                header = json.loads(head.decode("utf-8"))
                arrays = header["arrays"]
                vectors_at = arrays["vectors"]["offset"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise DamagedIndex(f"is damaged ({type(e).__name__})") from None
            body_start = _PREFIX + 8 + header_length
            tables = f.read(max(0, vectors_at - body_start))
            check = zlib.crc32(tables, check)
            size = 8 + header_length + len(tables)
            for chunk in iter(lambda: f.read(1 << 24), b""):  # the vectors: checked, not kept
                check = zlib.crc32(chunk, check)
                size += len(chunk)
            if size != length or check != crc:
                raise DamagedIndex("is damaged (checksum or length mismatch)")
            if header.get("image_dir") != str(self.image_dir) or header.get("cache_dir") != (str(self.cache_dir) if self.cache_dir else None):
                raise DamagedIndex(f"was written for another folder ({header.get('image_dir')})")
            try:
                table = {name: self._array(tables, body_start, spec) for name, spec in arrays.items() if name != "vectors"}
                spec = arrays["vectors"]
                rows, dim = spec["shape"]
                self.vectors = (np.memmap(f, dtype=np.float32, mode="r", offset=vectors_at, shape=(rows, dim))
                                if rows and dim else None)
                names = header["names"]
                self.encoders, self.vae_ids = list(header["encoders"]), list(header["vae_ids"])
            except (KeyError, ValueError, TypeError) as e:
                raise DamagedIndex(f"is damaged ({type(e).__name__}: {e})") from None
        self.names = list(names)
        self.row_of = {name: row for row, name in enumerate(self.names)}
        self.stats, self.dims = table["stats"], table["dims"]
        self.feature_stats, self.feature_encoder = table["feature_stats"], table["feature_encoder"]
        self.feature_flags, self.vector_row = table["feature_flags"], table["vector_row"]
        n = len(self.names)
        if any(len(a) != n for a in (self.stats, self.dims, self.feature_stats, self.feature_encoder, self.feature_flags, self.vector_row)):
            raise DamagedIndex("is damaged (columns of different lengths)")
        for record in table["latents"].tolist():  # (row, bucket, crop, vae, flipped, size, mtime) tuples
            row, bucket, crop, vae, flipped, size, mtime = record
            self.latents.setdefault(row, {})[tuple(bucket.tolist())] = (tuple(crop.tolist()), vae, bool(flipped), size, mtime)

    @staticmethod
    def _array(data: bytes, base: int, spec: dict) -> np.ndarray:
        dtype = LATENT_RECORD if spec["dtype"] == "latent" else np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"])) if spec["shape"] else 1
        start = spec["offset"] - base
        if start < 0 or start + count * dtype.itemsize > len(data):
            raise ValueError("an array lies outside the file")
        return np.frombuffer(data, dtype, count, start).reshape(spec["shape"]).copy()

    def save(self) -> None:
        """Write the index if anything changed (main process only), then serve the vectors from it."""
        if not (self.main and self._dirty and self._scan is not None):
            return
        keep = [self.row_of[image.path.name] for image in self._scan]
        remap = {old: new for new, old in enumerate(keep)}
        counts = Counter(int(self.feature_encoder[r]) for r in keep if self._vector(r) is not None)
        encoder = counts.most_common(1)[0][0] if counts else -1
        stored = [r for r in keep if encoder >= 0 and self.feature_encoder[r] == encoder and self._vector(r) is not None]
        dim = len(self._vector(stored[0])) if stored else 0
        stored = [r for r in stored if len(self._vector(r)) == dim]
        vector_row = np.full(len(keep), -1, np.int32)
        for k, r in enumerate(stored):
            vector_row[remap[r]] = k
        latents = np.array([(remap[row], bucket, crop, vae, flipped, size, mtime)
                            for row, buckets in self.latents.items() if row in remap
                            for bucket, (crop, vae, flipped, size, mtime) in buckets.items()], dtype=LATENT_RECORD)
        idx = np.asarray(keep, np.int64)
        tables = {"stats": self.stats[idx], "dims": self.dims[idx], "feature_stats": self.feature_stats[idx],
                  "feature_encoder": self.feature_encoder[idx], "feature_flags": self.feature_flags[idx],
                  "vector_row": vector_row, "latents": latents}
        try:
            self._write([self.names[r] for r in keep], tables, stored, dim)
        except (OSError, WriteFailed) as e:  # a read-only or full image folder: the run goes on without it
            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            self.say(f"note: cannot write the index {self.path} ({reason}); the next start reads every file again")
            return
        self._dirty = False
        self._load()  # the vectors now come from the file, shared with the other processes; the
        # scan stays valid (the rows are renumbered, the images are the same)

    def _write(self, names: list[str], tables: dict[str, np.ndarray], stored: list[int], dim: int) -> None:
        specs: dict[str, dict] = {}
        header = {"image_dir": str(self.image_dir), "cache_dir": str(self.cache_dir) if self.cache_dir else None,
                  "names": names, "encoders": self.encoders, "vae_ids": self.vae_ids, "arrays": specs}

        def layout(header_length: int) -> int:
            offset = _PREFIX + 8 + header_length
            for name, array in tables.items():
                offset += -offset % _ALIGN
                specs[name] = {"dtype": "latent" if name == "latents" else array.dtype.str, "shape": list(array.shape), "offset": offset}
                offset += array.nbytes
            offset += -offset % _ALIGN
            specs["vectors"] = {"dtype": "<f4", "shape": [len(stored), dim], "offset": offset}
            return offset

        length = 0
        while True:  # the header holds the offsets, which depend on its own length
            layout(length)
            text = json.dumps(header).encode("utf-8")
            if len(text) == length:
                break
            length = len(text)
        vectors_at = layout(length)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            f.write(bytes(_PREFIX))
            crc, size = 0, 0

            def put(data) -> None:
                nonlocal crc, size
                crc = zlib.crc32(data, crc)
                size += len(data)
                f.write(data)

            put(length.to_bytes(8, "little"))
            put(text)
            for name, array in tables.items():
                put(bytes(specs[name]["offset"] - _PREFIX - size))
                put(np.ascontiguousarray(array).tobytes())
            put(bytes(vectors_at - _PREFIX - size))
            for start in range(0, len(stored), 4096):
                chunk = np.stack([self._vector(r) for r in stored[start : start + 4096]]).astype(np.float32, copy=False)
                put(chunk.tobytes())
            f.seek(0)
            f.write(MAGIC + VERSION.to_bytes(4, "little") + crc.to_bytes(4, "little") + size.to_bytes(8, "little"))

    # -- images -----------------------------------------------------------------------------

    def images(self) -> list[ScannedImage]:
        """The folder's images in name order, each with its size or why it cannot be used: one
        scandir pass, header reads only for new and changed files (once per session)."""
        if self._scan is not None:
            return self._scan
        found = []
        with os.scandir(self.image_dir) as entries:
            for entry in entries:
                name = entry.name
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:  # as Path.suffix: ".png" alone is none
                    if self.main and name.startswith(".") and is_stale_temporary(name):
                        Path(entry.path).unlink(missing_ok=True)  # a cache write killed midway
                    continue
                try:
                    if not entry.is_file():
                        continue
                    st = entry.stat()
                except OSError:  # vanished while listing
                    continue
                found.append((name, int(st.st_size), int(st.st_mtime_ns)))
        found.sort()
        self._add_rows([name for name, _, _ in found if name not in self.row_of])
        scan = []
        stats = self.stats
        for name, size, mtime in found:
            row = self.row_of[name]
            if stats[row, 0] != size or stats[row, 1] != mtime:
                self._reset(row, size, mtime)
            path = self.image_dir / name
            if self.dims[row, 0] > 0:
                scan.append(ScannedImage(path, (int(self.dims[row, 0]), int(self.dims[row, 1])), None))
                continue
            try:  # failures are not recorded: a file fixed by chmod keeps its stat
                width, height = image_size(path)
            except ImageLoadError as e:
                scan.append(ScannedImage(path, None, e))
                continue
            self.dims[row] = (width, height)
            self._dirty = True
            scan.append(ScannedImage(path, (width, height), None))
        if len(scan) != len(self.names):
            self._dirty = True  # files were removed: drop their rows
        self._scan = scan
        return scan

    def _add_rows(self, names: list[str]) -> None:
        """Rows for new images, all at once (their stats (-1, -1) never match a file's)."""
        if not names:
            return
        self._dirty = True
        for name in names:
            self.row_of[name] = len(self.names)
            self.names.append(name)
        grow = lambda a, fill: np.concatenate([a, np.full((len(names), *a.shape[1:]), fill, a.dtype)])
        self.stats, self.dims = grow(self.stats, -1), grow(self.dims, 0)
        self.feature_stats, self.feature_encoder = grow(self.feature_stats, -1), grow(self.feature_encoder, -1)
        self.feature_flags, self.vector_row = grow(self.feature_flags, 0), grow(self.vector_row, -1)

    def _reset(self, row: int, size: int, mtime: int) -> None:
        """A new or changed image: its old records describe another file."""
        self._dirty = True
        self.stats[row] = (size, mtime)
        self.dims[row] = (0, 0)
        self._clear_feature(row)
        self.latents.pop(row, None)

    def _row(self, image_path: Path) -> int:
        self.images()
        return self.row_of[os.path.basename(image_path)]  # not Path(...): this runs once per image per start

    # -- feature caches ---------------------------------------------------------------------

    def _clear_feature(self, row: int) -> None:
        self.feature_stats[row] = _NO_STAT
        self.feature_encoder[row] = -1
        self.feature_flags[row] = 0
        self.vector_row[row] = -1
        self.fresh.pop(row, None)

    def _vector(self, row: int) -> np.ndarray | None:
        if row in self.fresh:
            return self.fresh[row]
        k = int(self.vector_row[row])
        return self.vectors[k] if k >= 0 and self.vectors is not None else None

    def feature(self, image_path: Path, cache_path: Path, read: Callable) -> FeatureRecord | None:
        """The feature cache of an image as recorded, when the cache's stat still matches the record;
        else `read(cache_path, image_path)` -> (vector, encoder id, current) is called and recorded.
        None when the cache file does not exist."""
        row = self._row(image_path)
        stat = _stat(cache_path)
        if stat is None:
            if self.feature_stats[row, 0] >= 0:
                self._clear_feature(row)
                self._dirty = True
            return None
        if tuple(self.feature_stats[row]) == stat and self.feature_encoder[row] >= 0:
            return self._feature_record(row)
        vector, encoder_id, current = read(cache_path, image_path)
        self._set_feature(row, stat, encoder_id, current, vector)
        return self._feature_record(row)

    def record_feature(self, image_path: Path, cache_path: Path, encoder_id: str, vector: np.ndarray) -> None:
        """A cache just written from the image (prepare_features.py): recorded without reading it back."""
        row = self._row(image_path)
        stat = _stat(cache_path)
        if stat is not None:
            self._set_feature(row, stat, encoder_id, _stat(image_path) == tuple(self.stats[row]), vector)

    def _set_feature(self, row: int, stat: tuple[int, int], encoder_id: str, current: bool, vector: np.ndarray) -> None:
        self._clear_feature(row)
        if encoder_id not in self.encoders:
            self.encoders.append(encoder_id)
        finite = bool(np.isfinite(vector).all())
        self.feature_stats[row] = stat
        self.feature_encoder[row] = self.encoders.index(encoder_id)
        self.feature_flags[row] = (CURRENT if current else 0) | (FINITE if finite else 0)
        if current and finite:
            self.fresh[row] = np.asarray(vector, np.float32)
        self._dirty = True

    def _feature_record(self, row: int) -> FeatureRecord:
        flags = int(self.feature_flags[row])
        return FeatureRecord(self.encoders[int(self.feature_encoder[row])], bool(flags & CURRENT), bool(flags & FINITE))

    def vector_source(self, image_path: Path) -> tuple[np.ndarray, int] | None:
        """(block, row) holding the image's vector as last validated by `feature`; None when the
        index keeps none (a stale or non-finite cache, or one of a rarer encoder in this folder)."""
        row = self.row_of[os.path.basename(image_path)]
        if row in self.fresh:
            return self.fresh[row][None], 0
        k = int(self.vector_row[row])
        return (self.vectors, k) if k >= 0 and self.vectors is not None else None

    # -- latent caches ----------------------------------------------------------------------

    def latent_valid(self, image_path: Path, cache_path: Path, bucket: tuple[int, int], crop: tuple[int, int, int, int],
                     vae_identity: str, need_flipped: bool, check: Callable[[], bool]) -> bool:
        """Whether a latent cache fits (its VAE, bucket and crop, and the image as it is), from the
        record when the file's stat matches it; else `check()` opens the file, and a fit is recorded."""
        row = self._row(image_path)
        stat = _stat(cache_path)
        if stat is None:
            return False
        key = (int(bucket[0]), int(bucket[1]))
        record = self.latents.get(row, {}).get(key)
        vae = self.vae_ids.index(vae_identity) if vae_identity in self.vae_ids else -1
        if record is not None and record[0] == tuple(crop) and record[1] == vae and (record[2] or not need_flipped) and record[3:] == stat:
            return True
        if not check():
            return False
        if vae < 0:
            self.vae_ids.append(vae_identity)
            vae = len(self.vae_ids) - 1
        self.latents.setdefault(row, {})[key] = (tuple(crop), vae, need_flipped, *stat)
        self._dirty = True
        return True


@dataclass
class DatasetIndex:
    """The folder indexes of one run, opened once and shared by the steps that read them (listing
    the images, the feature vectors, the latent caches). `main`: this process writes the files and
    says what it rebuilds (one process per node)."""

    main: bool = True
    say: Callable[[str], None] = print

    def __post_init__(self) -> None:
        self._folders: dict[tuple[Path, Path | None], FolderIndex] = {}

    def folder(self, image_dir: Path, cache_dir: Path | None) -> FolderIndex:
        found = self._folders.get((image_dir, cache_dir))  # asked once per image: no new Paths when known
        if found is not None:
            return found
        key = (Path(image_dir), Path(cache_dir) if cache_dir is not None else None)
        if key not in self._folders:
            self._folders[key] = FolderIndex(key[0], key[1], self.main, self.say)
        return self._folders[key]

    def save(self) -> None:
        for folder in self._folders.values():
            folder.save()
