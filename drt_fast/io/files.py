"""Writing files safely: probes before any work, atomic JSON, shared permissions, digests."""
from __future__ import annotations

import json
import os
import tempfile

from ..errors import DrtFastError


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes (identifies the model in the sidecar)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def probe_writable(path: str, what: str) -> None:
    """Raise a DrtFastError unless ``path`` can be written: a temporary file is created and
    removed in its folder (permission bits alone say nothing when running as root, in /proc
    or /sys, or on some network file systems) and an existing file is opened for appending
    (which changes nothing in it). ``what`` names the file in the message."""
    if os.path.isdir(path):
        raise DrtFastError(f"cannot write {what} to {path!r}: it is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DrtFastError(f"cannot write {what} to {path!r}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".drt-fast-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
        if os.path.exists(path):
            with open(path, "a"):
                pass
    except OSError as e:
        raise DrtFastError(f"cannot write {what} to {path!r}: {e.strerror or e}") from None


def created_file_mode() -> int:
    """The permission bits ``open()`` would give a new file under the current umask
    (``tempfile.mkstemp`` makes 0600 files; files that are meant to be shared get these)."""
    try:       # Linux says it without changing it (os.umask would, for every thread)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON so that readers see the old file or the new one, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        os.chmod(tmp, created_file_mode())
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
