"""Storage errors in words: a save that the disk, a limit or a permission stopped.

Orbax and TensorStore report a full disk as, e.g., ``OUT_OF_RANGE: Error writing "000000/0.0"
in OCDBT database ... [os_error_code='27']``. :func:`storage_failure` finds the cause in such an
error (an ``OSError``'s errno, TensorStore's ``os_error_code``, the C library's text, or the
status code), and :class:`CheckpointStorageError` says it in words: which file, what was hit
(the disk, a file-size limit, a quota, a read-only or missing directory) and whether the
previous checkpoint is intact, which the saver checks by reading it again before saying so.
"""

from __future__ import annotations

import errno
import re

from lora_jax.checkpoint.codec import CheckpointError

_CAUSES = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EFBIG: ("a file-size limit was hit (file too large: the process' RLIMIT_FSIZE, "
                  "`ulimit -f`, or the filesystem's largest file)"),
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied (the directory is not writable by this process)",
    errno.EPERM: "the operation is not permitted (permissions)",
    errno.ENOENT: "a directory it writes into does not exist (removed during the save?)",
}
_ADVICE = {
    errno.EROFS: "Save to a writable filesystem.",
    errno.EACCES: "Make the directory writable by this process, then save again.",
    errno.EPERM: "Make the directory writable by this process, then save again.",
    errno.ENOENT: "Check that the directory still exists (and was not moved), then save again.",
}
# The C library's words for them, as TensorStore quotes them.
_TEXTS = {
    "No space left on device": errno.ENOSPC,
    "File too large": errno.EFBIG,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Operation not permitted": errno.EPERM,
    "No such file or directory": errno.ENOENT,
}
# TensorStore / absl status codes, when nothing more precise is said.
_STATUS = {
    "RESOURCE_EXHAUSTED": errno.ENOSPC,
    "OUT_OF_RANGE": errno.EFBIG,
    "PERMISSION_DENIED": errno.EACCES,
    "NOT_FOUND": errno.ENOENT,
}
_FILE = re.compile(r'(?:Failed writing|Error writing local file|Failed to open|local file):? '
                   r'"([^"]+)"')


class CheckpointStorageError(CheckpointError):
    """A save failed because storage refused a write (a full disk, a file-size limit, a quota,
    a read-only or missing directory). The message names the file, the cause, and the state
    of the previous checkpoint."""


def cause_of(code: int | None) -> str | None:
    """The words for an errno this module knows, or None."""
    return _CAUSES.get(code) if code is not None else None


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def storage_failure(exc: BaseException) -> tuple[int, str | None] | None:
    """``(errno, file or None)`` if ``exc`` (or what caused it) is a storage failure, else
    None."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _CAUSES:
            return e.errno, e.filename if isinstance(e.filename, str) else None
    text = " ".join(str(e) for e in _chain(exc))
    found = _FILE.findall(text)
    where = found[-1] if found else None
    if m := re.search(r"os_error_code='?(\d+)", text):
        code = int(m.group(1))
        if code in _CAUSES:
            return code, where
    for words, code in _TEXTS.items():
        if words in text:
            return code, where
    for status, code in _STATUS.items():
        if status + ":" in text:
            return code, where
    return None


def save_failed(what: str, path: str, exc: BaseException, previous: str | None,
                previous_intact: BaseException | None | bool) -> CheckpointStorageError:
    """The error of a save of ``path`` that storage stopped (``storage_failure(exc)`` is not
    None): which file, the cause, and the previous checkpoint's state.

    Args:
      previous: what was there before (``"the previous adapter at <path>"``), or None.
      previous_intact: True if it was read again whole after the failure, or the exception
        reading it raised.
    """
    found = storage_failure(exc)
    assert found is not None
    code, where = found
    file = f" {where}" if where else f" under {path}"
    if previous is None:
        state = f"Nothing was saved at {path} (its partial files were removed)."
    elif previous_intact is True:
        state = (f"Nothing was replaced: {previous} is intact (read again after the "
                 "failure).")
    else:
        state = (f"{previous[0].upper()}{previous[1:]} could not be read again after the "
                 f"failure ({previous_intact}): it may be damaged.")
    return CheckpointStorageError(
        f"{what} of {path}: writing{file} failed: {_CAUSES[code]} "
        f"[{errno.errorcode.get(code, code)}]. "
        f"{state} {_ADVICE.get(code, 'Free space or raise the limit, then save again.')} "
        f"(Orbax/TensorStore said: "
        f"{type(exc).__name__}: {str(exc)[:400]})")
