"""Safe file I/O: atomic writes (a reader sees the old file or the new one, never half of one), checked JSON reads."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` via a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in `path`; `ValueError` naming `what` and the path if it is missing, not JSON, or not an object."""
    source = os.fspath(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} {source!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {source!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {source!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def check_format_version(data: dict, expected: int, what: str, source: str, remedy: str) -> None:
    """`ValueError` naming `source`, the version found and the one this pock_hf reads, unless they match."""
    version = data.get("format_version")
    if version != expected:
        raise ValueError(
            f"{source}: {what} format version {version!r} is not supported (this pock_hf reads version {expected}); "
            f"{remedy}."
        )
