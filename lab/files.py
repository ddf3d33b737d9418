"""Files the lab writes and reads: atomic writes (temp file + rename), bounded validated reads.

Every file is written to a temporary name and renamed into place, so a reader never sees half a
file; JSON written here is strict (NaN and infinities become null). Everything the lab reads (run
folders, experiment files, analysis caches) passes through `read_text`: a file too large for its
kind, a folder where a file should be, or bytes that are not UTF-8 raise one line naming the file,
instead of a UnicodeDecodeError or a MemoryError from deep inside. Run folders build on this in
`lab.runs.storage`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from lab.errors import RunError, StorageError


def storage_error(path: Path, err: OSError, doing: str = "write") -> StorageError:
    """A filesystem failure as one line naming the path: 'cannot write runs/x/summary.json: read-only file system'."""
    reason = os.strerror(err.errno).lower() if err.errno else str(err)
    if isinstance(err, (FileExistsError, NotADirectoryError)) or err.errno in (errno.ENOTDIR, errno.EEXIST):
        reason = "a file is in the way where a folder should be"
    return StorageError(f"cannot {doing} {path}: {reason}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise storage_error(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, StorageError):
            raise storage_error(path, err) from None
        raise


def finite_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: JSON has no NaN, and files we write stay standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value) for value in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps(obj, indent=2) + "\n").encode())


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: Path) -> tuple[dict, dict[str, str]]:
    """Load safetensors -> (tensors, metadata); a damaged file raises RunError naming it."""
    from safetensors import safe_open

    check_regular_file(path)  # a FIFO or device would hang or never end
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise RunError(f"{path}: not a readable safetensors file ({err})") from None


# --- JSON lines --------------------------------------------------------------------------------


def append_jsonl(path: Path, row: dict) -> None:
    """Append one whole line in a single write, so a crash leaves at most a torn last line."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (dumps(row) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise storage_error(Path(path), err) from None


def read_jsonl(path: Path) -> list[dict]:
    """Every complete row (each a JSON object); a torn final line (from a killed writer) is ignored."""
    # Missing: no rows yet. Checked before reading, not after a failed read: a writer may create the file
    # in between, and a file that appears must not turn "no rows yet" into an error. (A symlink loop or
    # a FIFO exists, so it is read, and refused, by read_text.)
    if not os.path.lexists(path):
        return []
    text = read_text(path, limit=max_metrics_bytes())
    rows = []
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn last line: no newline after it
                break
            raise RunError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise RunError(f"{path}: line {number} is a JSON {_json_kind(row)}, expected an object {{...}}")
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(dumps(row) + "\n" for row in rows).encode())


# --- bounded reads -------------------------------------------------------------------------------

MAX_JSON_BYTES = 64 << 20  # config.json, summary.json, analysis caches: kilobytes when sane


def available_memory_bytes() -> int:
    """RAM this machine can still give (MemAvailable), or total RAM where that is not reported."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 34


def max_metrics_bytes() -> int:
    """metrics.jsonl is parsed into Python objects (~10x its size): refuse one that could not fit."""
    return max(64 << 20, available_memory_bytes() // 16)


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def check_regular_file(path: Path) -> os.stat_result:
    """The file's stat if it is a regular file (symlinks followed); else one RunError line, without opening it:
    a FIFO would block a reader forever, /dev/zero never ends, a folder or a symlink loop is no file."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise RunError(f"{path}: a symlink loop, expected a file") from None
        raise storage_error(path, err, "read") from None
    if not stat.S_ISREG(info.st_mode):
        raise RunError(f"{path}: {_file_kind(info.st_mode)}, expected a regular file")
    return info


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    return "is not a regular file"


def read_bytes(path: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """A regular file's bytes, refused in one RunError/StorageError line if missing, not a regular file
    (FIFO, device, folder, symlink loop) or larger than `limit`; never reads more than `limit` + 1 bytes."""
    path = Path(path)
    info = check_regular_file(path)
    if info.st_size > limit:
        raise RunError(f"{path}: {info.st_size / 2**20:.1f} MiB is larger than the {limit / 2**20:.0f} MiB this file may have; it is not a lab file")
    try:  # O_NONBLOCK: if a FIFO replaced the file since the stat, opening it must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RunError(f"{path}: no such file") from None
    except OSError as err:
        raise storage_error(path, err, "read") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunError(f"{path}: {_file_kind(os.fstat(fd).st_mode)}, expected a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise storage_error(path, err, "read") from None
    finally:
        os.close(fd)
    if size > limit:  # it grew since the stat
        raise RunError(f"{path}: larger than the {limit / 2**20:.0f} MiB this file may have; it is not a lab file")
    return b"".join(chunks)


def read_text(path: Path, limit: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file, refused in one RunError/StorageError line if missing, not a regular file, too large,
    or not UTF-8 (see `read_bytes`)."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RunError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); the file is damaged") from None


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a file; missing, damaged, non-UTF-8, oversized or non-object files raise RunError naming it."""
    try:
        obj = json.loads(read_text(path, limit))
    except json.JSONDecodeError as err:
        raise RunError(f"{path}: damaged JSON ({err})") from None
    except RecursionError:
        raise RunError(f"{path}: damaged JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: expected a JSON object {{...}}, found a JSON {_json_kind(obj)}")
    return obj
