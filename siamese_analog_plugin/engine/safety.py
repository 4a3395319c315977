"""Nothing lost, whatever the input or the fault.

The guards every run's outputs go through (:func:`.outputs.atomic_outputs` uses them):

- :func:`check_outputs`: an output that is an input (the same file however it is spelled:
  relative, through a symlink, a hard link) or two outputs that are the same file are refused
  before anything is read.
- :func:`check_output_format`: an output whose extension is not the format written is refused.
- :func:`hold_destinations`: a lock file per destination (``.NAME.lock``, an OS lock released
  when the process dies, however it dies) held for the run's duration; a second run to the same
  destination refuses, naming the lock and the running process. Holding it, a run removes the
  partial files left by dead runs (their names carry the pid: ``.STEM.partial-PID-XXXX.EXT``).
- :func:`signals_deferred` / :func:`install_signal_handlers`: SIGTERM is handled like Ctrl-C,
  and neither interrupts the moment the outputs are moved into place as a set.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import uuid
from pathlib import Path

from .errors import InputError, OutputError

__all__ = [
    "same_file",
    "check_outputs",
    "check_output_format",
    "partial_name",
    "is_partial_of",
    "remove_stale_partials",
    "pid_alive",
    "lock_path",
    "hold_destinations",
    "signals_deferred",
    "install_signal_handlers",
    "restore_signal_handlers",
    "committed_outputs",
    "note_committed",
]

PARTIAL = re.compile(r"^\.(?P<stem>.*)\.partial-(?P<pid>\d+)-(?P<old>old)?[0-9a-f]+(?P<suffix>.*)$")
SIDECARS = ("", "-journal", "-wal", "-shm", ".aux.xml")


# -- identity ---------------------------------------------------------------------------------
def _plain(path) -> bool:
    s = str(path)
    return bool(s) and "://" not in s and not s.startswith("/vsi")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: equal once resolved (symlinks, ``..``, relative
    paths), or, when both exist, the same inode (hard links, case-insensitive file systems)."""
    if not (_plain(a) and _plain(b)):
        return str(a) == str(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _flatten(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    return [str(v) for v in value if v]


def check_outputs(outputs: dict[str, str | os.PathLike | None], inputs: dict[str, object]) -> None:
    """Refuse, before anything is read, an output that is an input or two outputs that are one file.

    Args:
        outputs: ``{what: path}`` of the files a run writes (``None``: not written), e.g.
            ``{"--out-raster": "a.tif"}``; ``what`` names it in the message.
        inputs: ``{what: path or list of paths}`` of the files it reads. Folders are inputs too:
            an output inside an input folder is allowed (it is not read), the folder itself not.

    Raises:
        InputError: naming both and the fix.
    """
    outs = [(what, str(p)) for what, p in outputs.items() if p]
    for what, path in outs:
        for in_what, value in inputs.items():
            for src in _flatten(value):
                if same_file(path, src):
                    raise InputError(f"The output {what} '{path}' is the input {in_what} '{src}': writing it would "
                                     "destroy the input", f"Choose another file name for {what}")
    for i, (what, path) in enumerate(outs):
        for other, other_path in outs[i + 1:]:
            if same_file(path, other_path):
                raise InputError(f"The outputs {what} and {other} are the same file '{path}'",
                                 f"Give {what} and {other} different file names")


def check_output_format(path: str | os.PathLike | None, what: str, suffixes: tuple[str, ...], kind: str) -> None:
    """Refuse an output whose extension is not the format written (e.g. a GeoPackage named .shp).

    Raises:
        InputError: naming the format written and the extensions it takes.
    """
    if path and not str(path).lower().endswith(suffixes):
        raise InputError(f"The {what} '{path}' does not end in {' or '.join(suffixes)}, but it is written as a {kind}",
                         f"Give a file name ending in {suffixes[0]}")


# -- partial files --------------------------------------------------------------------------
def partial_name(path: str | os.PathLike, tag: str = "") -> Path:
    """The hidden temporary name of ``path`` for this process: ``.STEM.partial-PID-XXXX.EXT``
    (the pid tells a later run whether the writer is still alive; the extension keeps the
    format drivers pick by it)."""
    p = Path(path)
    return p.with_name(f".{p.stem}.partial-{os.getpid()}-{tag}{uuid.uuid4().hex[:8]}{p.suffix}")


def is_partial_of(name: str, path: str | os.PathLike) -> int | None:
    """The pid in ``name`` when it is a partial file (or a sidecar of one) of ``path``, else ``None``."""
    p = Path(path)
    for side in SIDECARS:
        if side and name.endswith(side):
            name = name[: -len(side)]
            break
    m = PARTIAL.match(name)
    if m is None or m.group("stem") != p.stem or m.group("suffix") != p.suffix:
        return None
    return int(m.group("pid"))


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return False
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the partial files of ``path`` left by runs that died (their pid is not alive);
    call it holding the destination's lock. Returns the files removed."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = is_partial_of(name, p)
        if pid is None or pid_alive(pid):
            continue
        m = PARTIAL.match(name)
        if m is not None and m.group("old") and name.endswith(p.suffix) and not p.exists():
            # An older result a dead run had set aside and not replaced yet (killed in the
            # middle of moving its outputs): it goes back.
            with contextlib.suppress(OSError):
                os.replace(folder / name, p)
                continue
        with contextlib.suppress(OSError):
            (folder / name).unlink()
            removed.append(folder / name)
    return removed


# -- locks ------------------------------------------------------------------------------------
def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a destination: ``.NAME.lock`` beside it."""
    p = Path(os.path.realpath(path))
    return p.with_name(f".{p.name}.lock")


_held: dict[tuple[str, int], list] = {}  # (lock file, thread) -> [fd, depth]
_held_guard = threading.Lock()


def _lock_holder(lock: Path) -> str:
    try:
        pid = lock.read_text().split()[0]
        return f"process {int(pid)}"
    except (OSError, ValueError, IndexError):
        return "another process"


def _acquire(lock: Path, dest: str) -> int:
    """Open and lock ``lock`` (not waiting); the file descriptor. Raises OutputError when held."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"Cannot create the lock file '{lock}': {exc.strerror}",
                              "Choose a destination in a folder you can write to") from exc
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): the lock is the file's existence, with our pid
            os.close(fd)
            return _acquire_exclusive(lock, dest)
        except OSError:
            os.close(fd)
            holder = _lock_holder(lock)
            raise OutputError(f"The destination '{dest}' is being written by another run ({holder}; lock file "
                              f"'{lock}')", "Wait for that run to finish, or choose other output file names") from None
        # The file may have been removed (and made again) by the run that held it, between our
        # open and our lock: then we locked a file nobody else sees. Try again.
        try:
            mine, now = os.fstat(fd), os.stat(lock)
            same = (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)
        except OSError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _acquire_exclusive(lock: Path, dest: str) -> int:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except FileExistsError:
            try:
                pid = int(lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pid = -1
            if pid_alive(pid) and pid != os.getpid():
                raise OutputError(f"The destination '{dest}' is being written by another run (process {pid}; lock "
                                  f"file '{lock}')", "Wait for that run to finish, or choose other output file names") \
                    from None
            with contextlib.suppress(OSError):
                lock.unlink()  # a dead run's lock
    raise OutputError(f"Cannot take the lock file '{lock}'", "Remove it if no run is writing there")


@contextlib.contextmanager
def hold_destinations(paths):
    """Lock every destination in ``paths`` for the ``with`` block, then remove the stale partial
    files of dead runs beside them.

    Re-entrant in one thread (a face may hold its destinations from the start of the run and
    the writer again around the writes). Locks are OS locks (``flock``): a killed run's lock
    is released with it, and its lock file is simply reused.

    Raises:
        OutputError: a destination is held by another run (named, with its process id).
    """
    dests = {str(lock_path(p)): p for p in _flatten(paths) if _plain(p)}
    locks = sorted(dests)
    me = threading.get_ident()
    taken: list[str] = []
    try:
        for lock in locks:
            with _held_guard:
                entry = _held.get((lock, me))
                if entry is not None:
                    entry[1] += 1
                    taken.append(lock)
                    continue
            fd = _acquire(Path(lock), dests[lock])
            with _held_guard:
                _held[(lock, me)] = [fd, 1]
            taken.append(lock)
        for p in _flatten(paths):
            if _plain(p):
                remove_stale_partials(p)
        yield
    finally:
        for lock in reversed(taken):
            with _held_guard:
                entry = _held[(lock, me)]
                entry[1] -= 1
                if entry[1]:
                    continue
                del _held[(lock, me)]
            # Removed while still locked: a run waiting on this file retries on the new one.
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(entry[0])


# -- signals ----------------------------------------------------------------------------------
_deferring = 0
_pending: list[int] = []
_committed: list[str] = []


def committed_outputs() -> list[str]:
    """Destinations this process has moved into place so far (for an honest interrupt message)."""
    return list(_committed)


def note_committed(paths) -> None:
    """Record destinations moved into place (by :func:`.outputs.atomic_outputs`)."""
    _committed.extend(str(p) for p in paths)


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM (when :func:`install_signal_handlers` handles them) for the block:
    the moves that put a run's outputs into place all happen, or none; the signal is then
    raised as ``KeyboardInterrupt`` after the block."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            _pending.clear()
            raise KeyboardInterrupt


def _on_signal(signum, frame) -> None:
    if _deferring:
        _pending.append(signum)
        return
    raise KeyboardInterrupt


def install_signal_handlers() -> dict:
    """Handle SIGTERM as Ctrl-C (``KeyboardInterrupt``: temporary files removed, older outputs
    kept), both deferred while outputs are moved into place. Main thread only (the command line).

    Returns:
        the handlers replaced, for :func:`restore_signal_handlers`.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    before = {}
    for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
        if sig is not None:
            before[sig] = signal.signal(sig, _on_signal)
    return before


def restore_signal_handlers(before: dict) -> None:
    """Put back the handlers :func:`install_signal_handlers` replaced."""
    for sig, handler in before.items():
        if handler is not None:
            signal.signal(sig, handler)
