"""The tuning cache: measured choices kept on disk, per environment, so a model is timed once per machine.

A file holds tables for any number of environments (tune on an H200 and on an A100, ship one file). An
environment (`environment(device)`) is what a measurement depends on: the device (name and compute capability on
CUDA; the CPU's model name and torch's thread count on the CPU), and the torch, Triton, CUDA and mbkernels
versions. In a table, each entry is keyed by the candidate's signature (a JSON-able dict or string the planner
gives: op, shapes, layout, dtype, activation, ...) and holds the planner's JSON-able record (each variant's time,
the choice).

Environment variables:
  MBKERNELS_TUNING_CACHE=PATH   the table file (default: $XDG_CACHE_HOME/mbkernels/tuning.json, else
                                ~/.cache/mbkernels/tuning.json)
  MBKERNELS_TUNE=0              no tuning: `tuning_enabled()` is False (also "false", "no", "off")

Writes are atomic (a temporary file in the same directory, then os.replace) and made under an advisory lock
(fcntl.flock on PATH.lock, where fcntl exists), re-reading the file inside the lock and merging, so processes
tuning at once lose no entries. A file that is corrupt, truncated or not ours (another format, another version)
is ignored for reading and never overwritten; a file or directory that cannot be written keeps the results in
memory for the process. Either way, one TuningCacheWarning per file per process says so. The file is read once
per process (`TuningCache.load` keeps what it read).
"""
import json
import os
import platform
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .._version import installed_version

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; the atomic replace still keeps the file whole
    fcntl = None

CACHE_ENV = "MBKERNELS_TUNING_CACHE"
TUNE_ENV = "MBKERNELS_TUNE"
FORMAT = "mbkernels-tuning"
VERSION = 1
_OFF = ("0", "false", "no", "off")


class TuningCacheWarning(UserWarning):
    """The tuning cache file cannot be read or written; tuning goes on, results kept in memory."""


def tuning_enabled() -> bool:
    """False when MBKERNELS_TUNE is 0 (or false, no, off): patch then measures nothing."""
    return os.environ.get(TUNE_ENV, "1").strip().lower() not in _OFF


def cache_path() -> Path:
    """The table file: MBKERNELS_TUNING_CACHE, else $XDG_CACHE_HOME/mbkernels/tuning.json, else
    ~/.cache/mbkernels/tuning.json."""
    named = os.environ.get(CACHE_ENV)
    if named:
        return Path(named).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mbkernels" / "tuning.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Union[str, torch.device]) -> dict:
    """What a measurement on `device` depends on: the table key. Read at tuning time: on the CPU the thread count
    is torch's current one."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(device)
    fields = {"device_type": device.type}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        fields.update(device=torch.cuda.get_device_name(device), capability=f"{major}.{minor}",
                      cuda=torch.version.cuda)
    else:
        fields.update(device=_cpu_name(), threads=torch.get_num_threads())
    fields.update(torch=torch.__version__, triton=triton_version, mbkernels=installed_version(),
                  # Triton kernels under the interpreter run on the host: their times say nothing of the GPU's.
                  triton_interpret=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    return fields


def _key(value: Any) -> str:
    """The canonical JSON text of a signature or environment (sorted keys): equal values, equal keys. Strict
    JSON (no NaN or infinity), so that any JSON reader can read the file."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


class _Unusable(Exception):
    """The file is not one this version can read (the message says why)."""


def _parse(data: bytes) -> dict:
    """{environment key: (environment, {signature key: record})} of a file's bytes; _Unusable if not ours."""
    if not data.strip():
        return {}  # an empty file (created by hand): nothing in it to keep
    try:
        content = json.loads(data)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise _Unusable(f"it is not valid JSON (truncated or corrupt: {error})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise _Unusable(f"it is not an mbkernels tuning file (no \"format\": \"{FORMAT}\")")
    if content.get("version") != VERSION:
        raise _Unusable(f"it is format version {content.get('version')!r}; this mbkernels reads version {VERSION}")
    tables = content.get("tables")
    if not isinstance(tables, list) or not all(
            isinstance(t, dict) and isinstance(t.get("environment"), dict) and isinstance(t.get("entries"), dict)
            for t in tables):
        raise _Unusable("its \"tables\" are not a list of {\"environment\": {...}, \"entries\": {...}}")
    return {_key(t["environment"]): (t["environment"], dict(t["entries"])) for t in tables}


def _dump(tables: dict) -> bytes:
    content = {"format": FORMAT, "version": VERSION,
               "tables": [{"environment": env, "entries": entries} for env, entries in tables.values()]}
    return (json.dumps(content, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


class _File:
    """One table file as this process knows it: what it read, what it added since, whether it may write."""

    def __init__(self, path: Path):
        self.path = path
        self.tables = {}  # environment key -> (environment, {signature key: record})
        self.added = {}  # the same, this process's entries not yet saved
        self.writable = True  # False once refused: one warning per file per process (one _File per path)
        self.lock = threading.Lock()
        try:
            self.tables = _parse(path.read_bytes())
        except FileNotFoundError:
            pass
        except _Unusable as error:
            self.refuse(f"{error}; it is ignored and left as it is")
        except OSError as error:
            self.refuse(f"it cannot be read ({error})")

    def refuse(self, why: str) -> None:
        """Stop writing this file, and say why."""
        self.writable = False
        warnings.warn(f"mbkernels tuning cache {self.path}: {why}; tuning results are kept in memory for this "
                      f"process, not saved", TuningCacheWarning, stacklevel=4)

    def put(self, env: dict, signature_key: str, record: Any) -> None:
        for tables in (self.tables, self.added):
            tables.setdefault(_key(env), (env, {}))[1][signature_key] = record

    def save(self) -> bool:
        """Merge this process's new entries into the file (re-read under the lock); False if nothing was written."""
        with self.lock:
            if not self.added or not self.writable:
                return False
            if self.path.exists() and not self._user_writable():
                self.refuse("the file is read-only")
                return False
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(f"{self.path}.lock", "a") as lock:
                    if fcntl is not None:
                        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                    return self._merge_and_replace()
            except OSError as error:
                self.refuse(f"it cannot be written ({error})")
                return False

    def _user_writable(self) -> bool:
        """os.access, and some write permission bit: chmod a-w marks a file read-only even for root, to whom
        os.access says yes (an os.replace would go through: it needs only the directory's permission)."""
        return os.access(self.path, os.W_OK) and bool(self.path.stat().st_mode & 0o222)

    def _merge_and_replace(self) -> bool:
        try:
            on_disk = _parse(self.path.read_bytes())
        except FileNotFoundError:
            on_disk = {}
        except _Unusable as error:  # replaced by something else since it was read: still not ours to overwrite
            self.refuse(f"{error}; it is left as it is")
            return False
        for env_key, (env, entries) in self.added.items():
            on_disk.setdefault(env_key, (env, {}))[1].update(entries)
        handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            if self.path.exists():  # keep the file's permissions (mkstemp makes 0600)
                os.chmod(temporary, self.path.stat().st_mode & 0o777)
            with os.fdopen(handle, "wb") as file:
                file.write(_dump(on_disk))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise
        for env_key, (env, entries) in on_disk.items():  # other processes' entries are this one's too now
            self.tables.setdefault(env_key, (env, {}))[1].update(entries)
        self.added = {}
        return True


_FILES = {}  # resolved path -> _File: the in-process memo (each file read once per process)
_FILES_LOCK = threading.Lock()


class TuningCache:
    """The table of one environment in one file:

        cache = TuningCache.load("cuda")          # MBKERNELS_TUNING_CACHE or the default path
        record = cache.get(signature)             # None: not tuned here yet
        cache.put(signature, record); cache.save()
    """

    def __init__(self, file: _File, env: dict):
        self._file = file
        self.environment = env
        self._env_key = _key(env)

    @classmethod
    def load(cls, device: Union[str, torch.device, None], path: Union[str, Path, None] = None, *,
             env: Optional[dict] = None) -> "TuningCache":
        """The table for `device`'s environment (environment(device); or `env`, and device None) in the file at
        `path` (default: cache_path()). The file is read on the first load in the process; later loads share what
        was read (and what each save merged from the file)."""
        path = Path(path).expanduser() if path is not None else cache_path()
        key = os.path.realpath(path)
        with _FILES_LOCK:
            if key not in _FILES:
                _FILES[key] = _File(path)
            file = _FILES[key]
        return cls(file, env if env is not None else environment(device))

    @property
    def path(self) -> Path:
        return self._file.path

    def get(self, signature: Any) -> Optional[Any]:
        """The record stored for `signature` in this environment's table, or None."""
        table = self._file.tables.get(self._env_key)
        return None if table is None else table[1].get(_key(signature))

    def put(self, signature: Any, record: Any) -> None:
        """Keep `record` for `signature` (both JSON-able: dicts, lists, strings, finite numbers, bools, None);
        save() writes it. TypeError or ValueError if either is not."""
        record = json.loads(_key(record))  # a copy, checked now rather than when saving
        with self._file.lock:
            self._file.put(self.environment, _key(signature), record)

    def save(self) -> bool:
        """Write the entries put since the last save into the file, merged with what it holds now; False when
        nothing was written (nothing new, or the file is not writable: see the warning)."""
        return self._file.save()
