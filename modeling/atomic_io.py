"""Generic crash-safe file I/O: atomic single files, safetensors tensor files and their digest, folder swaps, a folder
lock (nothing here knows what a memory is; the memory layouts are in `memory_files`).

Guarantees (see README "Reliability"):
* a single file is replaced atomically (`atomic_write`: temp file, fsync, rename);
* a folder is replaced as a whole (`update_folder`): everything new is written into a staging folder beside it
  (files the update does not change are hard-linked, not copied), then the two folders are swapped in one
  `renameat2(RENAME_EXCHANGE)` (Linux) and the old one is removed. A crash leaves the old folder or the new one,
  never a mix; its leftovers (`.NAME.tmp-PID-*`) are removed by the next update once their process is gone;
* `folder_lock(folder)` serializes every read-modify-write of a folder across processes and threads (`filelock`).
"""

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from filelock import FileLock
from safetensors import safe_open
from safetensors.torch import save_file

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


# ---------------------------------------------------------------------------------------------- single files
def _tmp_prefix(name: str) -> str:
    return f"{TMP_MARK}{os.getpid()}-{name}-"


def _owner_is_gone(entry: str) -> bool:
    """Whether the process that created temp entry `...tmp-PID-...` has ended (then the entry is an orphan)."""
    pid = entry.split(TMP_MARK, 1)[1].split("-", 1)[0]
    if not pid.isdigit():
        return True  # older naming without a pid
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def remove_orphans(directory: str, stem: str = "") -> None:
    """Remove temp files/folders `<stem>.tmp-*` left in `directory` by writers that were killed."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.startswith(stem + TMP_MARK) and _owner_is_gone(entry[len(stem) :]):
            path = os.path.join(directory, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def remove_folder_orphans(folder: str | os.PathLike) -> None:
    """Remove what killed writers left of `folder`'s saves: temp entries beside it (`.<name>.tmp-*`, e.g. a staging
    folder) and inside it. The caller holds the folder lock."""
    folder = os.path.realpath(os.fspath(folder))
    parent, name = os.path.split(folder)
    remove_orphans(parent, f".{name}")
    remove_orphans(folder)


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Run `write(tmp_path)`, fsync, then rename over `path`: readers see the old file or the new, never half.
    Temp files of killed earlier writers of the same directory are removed first."""
    folder = os.path.dirname(os.path.abspath(path))
    remove_orphans(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(os.path.basename(path)))
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file private (0600): keep the replaced file's mode, or the usual one for a new file
        mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tensor_bytes(tensor: torch.Tensor):
    """The bytes of a tensor in row-major order (a view when it is contiguous on the CPU)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def tensor_header(name: str, dtype, shape) -> bytes:
    """What `tensors_digest` hashes before a tensor's bytes: its name, dtype and shape."""
    return f"{name}:{dtype}:{tuple(shape)};".encode()


def tensors_digest(tensors: Mapping[str, torch.Tensor], digest=None) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes, in order): the content hash of every memory file.
    `digest`: a sha256 already fed what comes before them."""
    digest = hashlib.sha256() if digest is None else digest
    for name, tensor in tensors.items():
        digest.update(tensor_header(name, tensor.dtype, tensor.shape))
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def read_tensor_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; raises SafetensorError / OSError for a broken or missing file."""
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata() or {}


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def map_tensor_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file whose tensors are views of a private memory map of the file: no
    byte is read until used, and the operating system may drop pages that were read (they are file-backed). The
    map outlives the file's removal or replacement. Raises ValueError / OSError for a broken or missing file."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise ValueError("file too small for a safetensors header")
        (length,) = struct.unpack("<Q", handle.read(8))
        if 8 + length > size:
            raise ValueError("incomplete safetensors header")
        header = json.loads(handle.read(length))
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + length else None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        start, end = (8 + length + offset for offset in info["data_offsets"])
        count = int(torch.tensor(info["shape"], dtype=torch.long).prod()) if info["shape"] else 1
        if dtype is None or end > size or end - start != count * torch.empty(0, dtype=dtype).element_size():
            raise ValueError(f"tensor {name} does not fit the file (truncated or corrupted)")
        if count:
            tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start).view(info["shape"])
        else:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
    return tensors, metadata


def write_tensor_file(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """One safetensors file, written atomically (metadata is str -> str; "format": "pt" is added)."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **metadata}))


# ---------------------------------------------------------------------------------------------- folder lock
_LOCKS: dict[tuple[int, str], FileLock] = {}  # per process: a lock object must not be used across a fork


def folder_lock(folder: str | os.PathLike) -> FileLock:
    """The inter-process lock of a model folder (re-entrant in one thread; other threads and processes wait).

    The lock file `.NAME.lock` lives beside the folder, so it survives the folder being swapped by `update_folder`.
    """
    folder = os.path.realpath(os.fspath(folder))
    parent, name = os.path.split(folder)
    path = os.path.join(parent, f".{name}.lock")
    key = (os.getpid(), path)
    if key not in _LOCKS:
        os.makedirs(parent, exist_ok=True)
        _LOCKS[key] = FileLock(path)
    return _LOCKS[key]


# ---------------------------------------------------------------------------------------------- folder updates
def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {b} for its new version: {os.strerror(err)}", b)


def _recover(folder: str) -> None:
    """A previous update died between its two renames (only without RENAME_EXCHANGE): put the old folder back."""
    parent, name = os.path.split(folder)
    if os.path.exists(folder):
        return
    backups = sorted(e for e in os.listdir(parent) if e.startswith(f".{name}{OLD_MARK}"))
    if backups:
        os.rename(os.path.join(parent, backups[-1]), folder)


def link_tree(source: str, target: str) -> None:
    """Hard-link `source` (file or folder tree) to `target`; copy where links are not possible."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
    elif os.path.isdir(source):
        shutil.copytree(source, target, symlinks=True, copy_function=link)
    else:
        link(source, target)


def update_folder(folder: str | os.PathLike, write: Callable[[str, str | None], Iterable[str]]) -> None:
    """Replace `folder` by a new version, crash-safely, under the folder lock.

    `write(staging, old)` writes the new files into the empty folder `staging` (`old` is the current folder, or
    None) and returns the names of old entries that must not survive (superseded files). Every other old entry
    that `staging` lacks is carried over (hard-linked). Then the folders are swapped and the old one is removed.
    A writer must never modify a carried-over file in place (write new files; `atomic_write` renames).
    """
    folder = os.path.realpath(os.fspath(folder))
    parent, name = os.path.split(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    with folder_lock(folder):
        _recover(folder)
        remove_folder_orphans(folder)
        old = folder if os.path.isdir(folder) else None
        staging = tempfile.mkdtemp(dir=parent, prefix=f".{name}{_tmp_prefix('save')}")
        try:
            dropped = set(write(staging, old))
            if old is not None:
                for entry in os.listdir(old):
                    if entry in dropped or os.path.lexists(os.path.join(staging, entry)) or TMP_MARK in entry:
                        continue
                    link_tree(os.path.join(old, entry), os.path.join(staging, entry))
            if old is not None:
                os.chmod(staging, os.stat(old).st_mode & 0o7777)
            else:
                os.chmod(staging, 0o777 & ~_UMASK)
            _fsync_directory(staging)
            if old is None:
                os.rename(staging, folder)
            elif not _exchange(staging, folder):
                backup = tempfile.mktemp(dir=parent, prefix=f".{name}{OLD_MARK}")
                os.rename(folder, backup)
                os.rename(staging, folder)
                os.rename(backup, staging)
            _fsync_directory(parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _read_umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: setting it is process-wide, not something to do while other threads write


def iter_orphans(folder: str) -> Iterator[str]:
    """Temp entries in or beside `folder` (for tests and checks)."""
    folder = os.path.realpath(folder)
    parent, name = os.path.split(folder)
    for directory, stem in ((parent, f".{name}"), (folder, "")):
        if os.path.isdir(directory):
            yield from (os.path.join(directory, e) for e in os.listdir(directory) if e.startswith(stem + TMP_MARK))
