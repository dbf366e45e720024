"""The lock that makes a run's output folder its own for the whole run.

The main process of a run holds an exclusive `flock` on `<output_dir>/.run.lock` from the moment it claims the
folder until the run ends. The kernel drops the lock when the process dies, however it dies (SIGKILL, the
out-of-memory killer), so a killed run never leaves the folder stuck: the file it leaves behind only names it, and
the next run takes the lock over and says so. The file holds the owner's pid, host, start time and command line,
which is what a refused run prints. The other processes of a multi-process run do not lock: the main process's
lock covers them (accelerate and torchrun end them with it).

A flock rather than a file created with O_EXCL: such a file outlives a killed process, and clearing it would need a
guess (is pid N still alive, on this host?); the kernel releases a flock and needs no guess.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from onpolicy_kd.console import console
from onpolicy_kd.errors import UserError

try:
    import fcntl
except ImportError:  # Windows has no flock: runs there are not kept apart
    fcntl = None

LOCK_FILE = ".run.lock"


@dataclass
class FolderLock:
    path: Path
    fd: int
    created_folder: bool  # the claim created the output folder: removed again if the run leaves it empty

    def release(self) -> None:
        # the file goes first, the lock second: a run that opened the file meanwhile finds it gone and opens anew
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        if self.created_folder:
            try:
                self.path.parent.rmdir()  # only when empty: a run refused at start-up leaves nothing behind
            except OSError:
                pass


def holder_text(holder: dict) -> str:
    text = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
    return text + (f": {holder['command']}" if holder.get("command") else "")


def in_use(folder: Path, holder: dict) -> UserError:
    return UserError(f"train.output_dir={folder} is in use by another run ({holder_text(holder)}); a folder holds one "
                     f"run at a time: wait for that run to end (or stop it), or choose another train.output_dir")


def _holder(fd: int, wait: bool) -> dict:
    """What the lock file says about its owner. `wait`: an owner writes it just after taking the lock, so an empty
    file held by someone is read again for a moment."""
    for _ in range(20 if wait else 1):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode(errors="replace").strip()
        if text:
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return {"pid": text[:40]}
        if wait:
            time.sleep(0.05)
    return {}


def take_lock(folder: Path) -> tuple[FolderLock | None, dict]:
    """Lock `folder` (created if needed) for this process: (the lock, what a dead earlier owner left in the lock
    file, {} when none). A live owner is a UserError that names it."""
    if fcntl is None:
        return None, {}
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd, wait=True)
            os.close(fd)
            raise in_use(folder, holder) from None
        except OSError as err:  # a file system without locks (some network mounts): the run goes on, unprotected
            os.close(fd)
            path.unlink(missing_ok=True)
            console.print(f"[yellow]warning:[/] train.output_dir={folder} cannot be locked ({err.strerror or err}): "
                          f"nothing stops a second run from writing into it at the same time")
            return None, {}
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            ours = False
        if ours:
            break
        os.close(fd)  # the owner removed the file as it ended, after we opened it: lock the one at the path now
    left = _holder(fd, wait=False)  # a normal end removes the file: anything in it is a killed run's
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return FolderLock(path, fd, created), left


def lock_holder(folder: Path) -> dict | None:
    """Who holds `folder`'s lock now (None: nobody), found without taking it (what --dry-run reports)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd, wait=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
