"""Atomic file writes and the JSON reader: a reader sees the old file or the new one, never a torn one.

Every write goes to a temporary file in the destination's folder (same file system), is flushed
and fsynced, and then replaces the destination with ``os.replace``; a write that fails or is
interrupted removes its temporary file and leaves the old file in place. The new file gets the
permissions ``open()`` would give it (0o666 less the umask) unless ``mode`` says otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any, Optional

from cipherdm_torch.errors import UserError

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "read_json"]


def atomic_write_bytes(path: str, data: bytes, mode: Optional[int] = None) -> None:
    """Write ``data`` to ``path`` atomically (creating its folder if needed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.path.basename(path)}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str, mode: Optional[int] = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str, obj: Any, indent: int = 2, sort_keys: bool = True,
                      allow_nan: bool = False, mode: Optional[int] = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically.

    ``allow_nan=False`` (the default): NaN / inf is not JSON, so a record that holds one is
    refused with ``ValueError`` and the old file stays in place rather than being replaced by an
    invalid one. Reports that may hold an infinite PSNR pass ``allow_nan=True``.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)
    atomic_write_text(path, text + "\n", mode)


def read_json(path: str) -> Any:
    """The JSON in ``path``; ``FileNotFoundError`` if it is missing, :class:`UserError` if damaged."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): the file is damaged; restore it or "
                        f"write it again") from e
