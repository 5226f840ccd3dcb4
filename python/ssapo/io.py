"""Small file helpers shared by the commands: atomic writes and readers of
1-D columns from .npy / .csv / .jsonl."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from typing import Callable, Optional

import numpy as np

from ssapo.errors import ConfigError, InputError

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it): the mode new files get
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[str], None]) -> str:
    """Calls `write_fn(tmp_path)` on a temp file in the target's directory,
    then renames it onto `path`, so a crash or a kill never leaves a partial
    file behind. The temp name keeps the target's suffix (numpy and pyarrow
    look at it)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=os.path.splitext(base)[1] or ".tmp", dir=parent)
    try:  # mkstemp's file is the owner's alone (0600): give it the target's mode, else what open() would
        os.fchmod(fd, os.stat(path).st_mode & 0o7777 if os.path.exists(path) else 0o666 & ~_UMASK)
    except OSError:
        pass
    os.close(fd)
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, obj) -> str:
    """Atomic JSON dump."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)

    return atomic_write(path, w)


def write_jsonl(path: str | os.PathLike, rows) -> str:
    """Atomic JSON-lines dump, one object per row."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            for r in rows:
                f.write(json.dumps(r, default=_jsonable) + "\n")

    return atomic_write(path, w)


def read_jsonl(path: str | os.PathLike) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def read_column(
    path: str, column: Optional[str] = None, arg: str = "input", column_arg: str = "--column"
) -> np.ndarray:
    """Reads a 1-D float column: .npy (a 1-D array), .csv (a header row;
    `column`, default "xi"), .jsonl (one object per line; `column`, default "xi").
    Errors are `InputError`s whose message starts with the argument at fault:
    `arg` for the file itself, `column_arg` for the column."""
    if not os.path.exists(path):
        raise InputError(f"{arg}: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{arg}: cannot read {path} as .npy ({e})") from None
        if a.ndim != 1:
            raise InputError(f"{arg}: {path} holds an array of shape {a.shape}; need 1-D")
        if np.iscomplexobj(a):  # numpy would drop the imaginary parts (a ComplexWarning)
            raise InputError(f"{arg}: {path} holds complex numbers (dtype {a.dtype}); need real numbers")
        if a.dtype.kind in "biuf":
            return np.asarray(a, dtype=np.float64)
        return _floats(a.tolist(), arg, path)  # strings: read one by one, as a text column's values are
    col = column or "xi"
    colarg = column_arg
    if ext == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or col not in reader.fieldnames:
                raise InputError(f"{colarg}: {path} has no column {col!r} (columns: {reader.fieldnames})")
            vals = [row[col] for row in reader]
    elif ext in (".jsonl", ".ndjson"):
        vals = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{arg}: line {lineno} of {path} is not JSON ({e})") from None
                if not isinstance(row, dict) or col not in row:
                    raise InputError(f"{colarg}: line {lineno} of {path} has no key {col!r}")
                vals.append(row[col])
    else:
        raise InputError(f"{arg}: unknown file type {ext!r} (use .npy, .csv or .jsonl)")
    return _floats(vals, colarg, f"{col!r} of {path}")


def _floats(vals, arg: str, where: str) -> np.ndarray:
    """`vals` as float64; InputError naming `arg` at the first value that is not a real number (a complex
    one, '1+2j', said as such: its imaginary part is never dropped)."""
    out = np.empty(len(vals), dtype=np.float64)
    for i, v in enumerate(vals):
        try:
            out[i] = float(v)
        except (TypeError, ValueError) as e:
            if _is_complex(v):
                raise InputError(
                    f"{arg}: {where} holds a complex number, {v!r} (row {i + 1}); need real numbers"
                ) from None
            raise InputError(f"{arg}: {where} holds a value that is not a number ({e})") from None
    return out


def _is_complex(v) -> bool:
    """Whether `v` reads as a complex number with a non-zero imaginary part ('1+2j', '3j')."""
    try:
        return isinstance(v, str) and complex(v.strip().replace(" ", "")).imag != 0
    except ValueError:
        return False


LOCK_NAME = ".ssapo.lock"  # in a run directory: held by the one process that drives the run


class RunLock:
    """One writer per run directory: an exclusive `flock` on DIR/.ssapo.lock, held while a run is driven
    (`with RunLock(out): ...`). The kernel drops it when its holder exits, however it exits (a SIGKILL
    included), so a lock file left by a killed run never blocks `--resume`. The holder's pid, host, start
    time and command are written into the file for the error the next writer gets: ConfigError naming
    the directory and the holder, raised at once (never a wait). POSIX only; a filesystem without flock
    (some network mounts) is not protected, and says so in a warning."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        self.path = os.path.join(self.out, LOCK_NAME)
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        import fcntl
        import socket
        import sys
        import time
        import warnings

        os.makedirs(self.out, exist_ok=True)
        try:
            fd, writable = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), True
        except OSError:  # a read-only run directory: lock the file if it is there, else run unprotected
            try:
                fd, writable = os.open(self.path, os.O_RDONLY), False
            except OSError as e:
                warnings.warn(f"output_dir: cannot lock {self.path} ({e.strerror or e})", stacklevel=2)
                return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"output_dir: {self.out} is in use by another ssapo run ({holder}); wait for it to end, stop it, "
                "or choose another directory"
            ) from None
        except OSError as e:  # no flock here (e.g. some network filesystems): run unprotected, and say so
            warnings.warn(
                f"output_dir: cannot lock {self.path} ({e}); two runs on it would not be stopped", stacklevel=2
            )
        if writable:
            info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            info += " ".join(sys.argv)[:300]
            os.ftruncate(fd, 0)
            os.pwrite(fd, (info + "\n").encode(), 0)
        self._fd = fd
        return self

    @property
    def fd(self) -> Optional[int]:
        """The locked file's descriptor while held (None otherwise): a child given it (`pass_fds`) holds the
        lock with this process, until both have closed it."""
        return self._fd

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None


# errno of a fault of the machine (not of the input): the one-line message `machine_fault` gives, and what to do
_FAULTS = {
    "ENOSPC": ("no space left on the device", "free space"),
    "EDQUOT": ("disk quota exceeded", "free space or raise the quota"),
    "EROFS": ("the filesystem is read-only", "make it writable or choose another output_dir"),
    "EACCES": ("permission denied", "fix its permissions or choose another output_dir"),
    "EPERM": ("operation not permitted", "fix its permissions or choose another output_dir"),
    "ENOTDIR": ("a file stands where a directory is needed", "move the file or choose another output_dir"),
    "EEXIST": ("a file stands where a directory is needed", "move the file or choose another output_dir"),
    "EISDIR": ("a directory stands where a file is needed", "move it or choose another output_dir"),
    "EIO": ("an input/output error of the device", "check the device"),
}
# how libraries that wrap an OSError in their own exception spell these faults (safetensors' SafetensorError,
# torch's PytorchStreamWriter RuntimeError, ...): the text of the errno's message
_FAULT_TEXTS = {
    "ENOSPC": ("no space left on device", "storagefull", "os error 28"),
    "EDQUOT": ("disk quota exceeded", "os error 122"),
    "EROFS": ("read-only file system", "os error 30"),
}


def machine_fault(exc: BaseException, where: Optional[str] = None) -> Optional[str]:
    """The one-line message of a fault of the machine (disk full, a read-only filesystem, permissions, a file
    where a directory should be, an I/O error) behind `exc` (the exception itself or one it was raised from or
    during), or None when `exc` is not one. It names the path (the OSError's, else `where`), says that nothing
    already written was lost (ssapo writes every file to a temp name and renames it; state.json records only
    finished steps) and how to go on."""
    import errno as _errno

    seen, e, name, path = set(), exc, None, None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            code = _errno.errorcode.get(e.errno)
            if code in _FAULTS:
                name, path = code, e.filename or path
                break
        text = str(e).lower()
        hit = next((c for c, texts in _FAULT_TEXTS.items() if any(t in text for t in texts)), None)
        if hit is not None:
            name = hit
            break
        e = e.__cause__ or e.__context__
    if name is None:
        return None
    what, then = _FAULTS[name]
    path = os.fspath(path) if path is not None else where
    at = f"{path}: " if path else ""
    return (
        f"{at}{what} ({name}); nothing already written was lost (files are written whole, then renamed; "
        f"state.json records finished steps only); {then}, then continue with --resume"
    )
