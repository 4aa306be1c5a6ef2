"""Safe file I/O: atomic writes (a reader sees the old file or the new one, never half of one), checked JSON reads.

Everything pock_hf writes (tables, cost profiles, plans, reports, plots, partial measurements) goes through
`atomic_write_bytes`, and everything it reads back is JSON checked field by field (`dataclass_from_json`): a file that
was cut short, edited by hand or written by another version fails with a message naming the file and the field, and
nothing in it is ever executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import os
import tempfile
import types
import typing
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder, fsync it, rename it over `path`, then fsync the
    folder (so the rename itself survives a power loss). A process killed at any moment leaves the old file or the
    new one; at worst a hidden `.{name}.*.tmp` file that nothing reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Save a matplotlib `figure` as a PNG at `path` (atomically, like every other output) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in `path`.

    Raises:
        ValueError: naming `what` and the path, if it is missing, a folder, not UTF-8, not JSON (e.g. cut short by an
            interrupted copy), or not a JSON object.
    """
    source = os.fspath(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {source!r} does not exist.") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {source!r} is a folder, not a JSON file.") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {source!r} is not UTF-8 text (byte {error.start}): not a JSON file.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {source!r} is not valid JSON (it may be cut short or damaged): {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {source!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def check_format_version(data: dict, expected: int, what: str, source: str, remedy: str) -> None:
    """`ValueError` naming `source`, the version found and the one this pock_hf reads, unless they match.

    A newer version asks for a newer pock_hf; an older or missing one gives `remedy` (e.g. "measure it again").
    """
    version = data.get("format_version")
    if version == expected:
        return
    if "format_version" not in data:
        raise ValueError(f"{source}: no 'format_version' field, so not a pock_hf {what} file; {remedy}.")
    if isinstance(version, int) and not isinstance(version, bool) and version > expected:
        raise ValueError(
            f"{source}: {what} format version {version} was written by a newer pock_hf (this one reads version "
            f"{expected}); upgrade pock_hf to read it."
        )
    raise ValueError(
        f"{source}: {what} format version {version!r} is not supported (this pock_hf reads version {expected}); "
        f"{remedy}."
    )


# --- typed reading of JSON into dataclasses ------------------------------------------------------------------------


def dataclass_from_json(cls: type, data: object, source: str, where: str = "") -> object:
    """An instance of the dataclass `cls` built from the JSON value `data`, every field checked against its type hint.

    JSON lists become tuples where the hint says so, ints become floats where a float is expected, and nested
    dataclasses are built the same way. Only these hints are understood: `bool`, `int`, `float`, `str`, `dict`,
    `list`, `tuple` (with or without argument types), unions with `None`, nested dataclasses.

    Raises:
        ValueError: naming `source` and the field path (e.g. `rows[3].gain`), when `data` is not an object, a field is
            missing, unknown (with the closest known name), or of the wrong type.
    """
    label = where or "the file"
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {label} must be a JSON object, got {_json_type(data)}.")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"{source}: unknown field {_join(where, unknown[0])!r}{hint}; a {cls.__name__} has {sorted(fields)}."
        )
    missing = [
        name
        for name, field in fields.items()
        if name not in data and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{source}: missing field {_join(where, missing[0])!r} of a {cls.__name__}.")
    values = {name: _convert(value, hints[name], source, _join(where, name)) for name, value in data.items()}
    return cls(**values)


class _Mismatch(Exception):
    """A JSON value that does not fit a type hint (caught to try the next member of a union)."""


def _convert(value: object, hint: object, source: str, where: str) -> object:
    try:
        return _fit(value, hint, source, where)
    except _Mismatch:
        raise ValueError(
            f"{source}: field {where!r} must be {_describe(hint)}, got {_json_type(value)} {_short(value)}."
        ) from None


def _fit(value: object, hint: object, source: str, where: str) -> object:
    """`value` converted to `hint`; `_Mismatch` if it does not fit (a nested field's error is a `ValueError`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for member in args:
            if member is type(None):
                continue
            try:
                return _fit(value, member, source, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _Mismatch
        return dataclass_from_json(hint, value, source, where)
    if hint is bool or hint is str:
        if type(value) is not hint:
            raise _Mismatch
        return value
    if hint is int:
        if type(value) is not int:
            raise _Mismatch
        return value
    if hint is float:
        if type(value) not in (int, float):
            raise _Mismatch
        return float(value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return value
        return {key: _convert(item, args[1], source, f"{where}[{key}]") for key, item in value.items()}
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, list):
            raise _Mismatch
        container = tuple if tuple in (hint, origin) else list
        if not args:
            return container(value)
        if origin is tuple and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(
                _convert(item, arg, source, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args))
            )
        return container(_convert(item, args[0], source, f"{where}[{i}]") for i, item in enumerate(value))
    raise TypeError(f"dataclass_from_json does not understand the type hint {hint!r}")  # a pock_hf bug


def _describe(hint: object) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}
    if hint in names:
        return names[hint]
    if origin is dict:
        return f"an object of {_describe(args[1])}"
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} items ({', '.join(_describe(arg) for arg in args)})"
    if args:
        return f"a list of {_describe(args[0])}"
    return "a list"


def _json_type(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(where: str, name: object) -> str:
    return f"{where}.{name}" if where else str(name)
