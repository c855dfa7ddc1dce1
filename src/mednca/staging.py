"""Writing files so that no crash, kill or full disk ever leaves half a file where a result should be.

Every writer stages its output under a temporary name in the destination folder (same file system, so the
final rename is atomic) and renames it into place only once it is complete. The temporary name says who made
it (``.mednca-tmp-<host>-<pid>-...``): what a killed writer left behind is recognised and removed later by
:func:`remove_stale_temp`, without touching a write that is still in progress.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".mednca-tmp-"  # + host, pid


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` when the block ends without error,
    and is removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path.parent, path.suffix)
    try:  # created inside: a Ctrl-C arriving as it is made still removes it
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        yield tmp
        os.chmod(tmp, _mode_for(path))  # it was made private; the result gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_path(folder: Path, suffix: str = "") -> Path:
    """A new temporary name in ``folder`` (nothing is created): ``temp_prefix()``, 16 random hex digits,
    ``suffix``. The caller creates it exclusively inside the block that removes it on failure, so that no
    interruption can leave it behind (``tempfile.mkstemp`` creates the file before its caller can guard it)."""
    return folder / f"{temp_prefix()}{secrets.token_hex(8)}{suffix}"


def _mode_for(path: Path) -> int:
    """The mode a file written in place would have: the replaced file's, or the default under the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def temp_prefix() -> str:
    """This process's temporary names: ``.mednca-tmp-<host>-<pid>-``, the pid telling whether it still runs."""
    return f"{_host_prefix()}{os.getpid()}-"


def remove_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that writers left in ``folder`` when their process was killed
    (their process id no longer runs on this host); returns what was removed.

    Those of writers that still run, or that ran on another host sharing the folder, are left alone, and so
    is everything on a system where a process cannot be looked up by id (Windows).
    """
    folder = Path(folder)
    mine = re.compile(rf"^{re.escape(_host_prefix())}(\d+)-")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = mine.match(entry.name)
        if match and not _process_alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _host_prefix() -> str:
    """``.mednca-tmp-<host>-``: the start of every temporary name this host's writers make. The host keeps
    a cleaner on one machine off the files of a writer on another machine sharing the folder."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
    return f"{TEMP_PREFIX}{host}-"


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host; True when that cannot be known, so nothing in use is removed."""
    if os.name != "posix" or pid == os.getpid():
        return True  # on Windows os.kill(pid, 0) would send Ctrl-C, not look the process up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True
