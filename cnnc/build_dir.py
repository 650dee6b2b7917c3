"""What makes a directory a cnnc build, and who may use it.

A build directory holds a `.cnnc-build` marker, written before anything
else, so that `cnnc compile -o DIR` never deletes or overwrites files of a
directory it did not make.  Its manifest.json records the sha256 of every
file it lists; a build is used only when every file still matches, so a
hand edit, a truncated file or a mix of two builds is refused rather than
run.  One process at a time holds a build (compile, run, bench): the lock
is an flock on `.cnnc-lock` holding the holder's pid, which the kernel
releases when that process dies, so a lock left by a killed process is
simply taken over.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MARKER = ".cnnc-build"
LOCK = ".cnnc-lock"
MANIFEST_FORMAT = 2                  # 2: with the sha256 of every file
# generated sources, cubins and PTX: a backend picks them by name, so one the manifest does not list
# (left by another build) must neither be loaded nor kept
ARTEFACT_RE = re.compile(r"gpu\d+\.(cu|cl|cpu\.cl|ptx|sm_\w+\.cubin)")


class BuildError(Exception):
    """A build directory that cannot be used as it is: not ours, locked, or not what its manifest says."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recompile(build_dir: Path, manifest: dict | None = None) -> str:
    source = manifest.get("source") if isinstance(manifest, dict) else None
    if not isinstance(source, str) or not source.isprintable() or not source:
        source = "NET.cnn"
    return f"recompile with: cnnc compile {shlex.quote(source)} -o {shlex.quote(str(build_dir))}"


def read_manifest(build_dir: Path) -> dict:
    """The manifest of a build, with its file list and hashes checked for shape (not yet against the files)."""
    f = build_dir / "manifest.json"
    try:
        m = json.loads(f.read_bytes())
    except OSError as e:
        raise BuildError(f"{f} cannot be read ({e.strerror or e}); {_recompile(build_dir)}") from None
    except ValueError:
        raise BuildError(f"{f} is damaged (not JSON); {_recompile(build_dir)}") from None
    if not isinstance(m, dict):
        raise BuildError(f"{f} is damaged (not an object); {_recompile(build_dir)}")
    if m.get("format") != MANIFEST_FORMAT or "sha256" not in m:
        raise BuildError(f"{f} has no file hashes (written by another cnnc version); {_recompile(build_dir, m)}")
    files, hashes = m.get("files"), m.get("sha256")
    if not (isinstance(files, list) and isinstance(hashes, dict) and "plan.json" in files
            and all(isinstance(n, str) and _plain_name(n) for n in files) and set(files) == set(hashes)
            and all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes.values())):
        raise BuildError(f"{f} is damaged (its file list or hashes); {_recompile(build_dir, m)}")
    return m


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def verify_files(build_dir: Path, manifest: dict) -> None:
    """Raise BuildError unless every file the manifest lists is there with its recorded hash,
    and no generated source or cubin it does not list lies beside them."""
    for name in manifest["files"]:
        path = build_dir / name
        if not path.is_file():
            raise BuildError(f"{path} is missing; {_recompile(build_dir, manifest)}")
        if sha256_file(path) != manifest["sha256"][name]:
            raise BuildError(f"{path} does not match its manifest (edited or from another build); "
                             f"{_recompile(build_dir, manifest)}")
    listed = set(manifest["files"])
    for f in sorted(build_dir.iterdir()):
        if ARTEFACT_RE.fullmatch(f.name) and f.name not in listed:
            raise BuildError(f"{f} is not part of this build (from another build); {_recompile(build_dir, manifest)}")


def claim(out_dir: Path) -> None:
    """Make `out_dir` (an existing directory) a build directory, or refuse: only an empty
    directory, one with the marker, or a build written by an earlier cnnc (a cnnc manifest
    beside a plan.json) may be compiled into."""
    if (out_dir / MARKER).is_file():
        return
    if any(e.name != LOCK for e in out_dir.iterdir()) and not _earlier_build(out_dir):
        raise BuildError(f"{out_dir} is not empty and not a cnnc build directory; choose another -o")
    (out_dir / MARKER).write_text("a cnnc build directory: cnnc compile may replace the files its manifest lists\n")


def _earlier_build(out_dir: Path) -> bool:
    try:
        m = json.loads((out_dir / "manifest.json").read_bytes())
    except (OSError, ValueError):
        return False
    return (isinstance(m, dict) and isinstance(m.get("inputs_hash"), str) and "cnnc_version" in m
            and (out_dir / "plan.json").is_file())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):        # no such process (or no such pid at all)
        return False
    except PermissionError:             # someone else's process
        return True
    return True


def scratch_prefix(out_dir: Path) -> str:
    """Scratch folders of a compile lie beside `out_dir` (in its parent) and carry the pid of
    the compiling process."""
    return f".{out_dir.name}.build-{os.getpid()}-"


def clean_scratch(out_dir: Path) -> None:
    """Remove scratch folders of `out_dir` that compiles since killed (or failed in nvcc) left behind."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.build-(\d+)-\w+")
    for e in out_dir.parent.iterdir():
        m = pattern.fullmatch(e.name)
        if m and int(m[1]) != os.getpid() and not _pid_alive(int(m[1])) and e.is_dir() and not e.is_symlink():
            shutil.rmtree(e, ignore_errors=True)


def _holder(fd: int) -> str:
    """The pid a lock file names; a holder may not have written it yet, so look twice."""
    for _ in range(2):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            return text
        time.sleep(0.05)
    return ""


def _acquire(build_dir: Path) -> int | None:
    """An open descriptor of the build's lock file, flocked by this process; None where this
    user cannot write the directory."""
    path = build_dir / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise BuildError(f"{build_dir} is locked by " + (f"pid {pid}" if pid else "another process")) from None
        except BaseException:
            os.close(fd)
            raise
        try:                            # the holder before us may have removed the file we opened
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Hold `build_dir` for this process, or fail at once naming the process that holds it.

    Without a directory there is nothing to hold (the caller reports the missing build);
    a directory this user may not write to cannot be compiled into by it either, so it is
    used unlocked."""
    build_dir = Path(build_dir)
    fd = _acquire(build_dir) if build_dir.is_dir() else None
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            (build_dir / LOCK).unlink(missing_ok=True)      # while still holding it, so no one else's goes
        finally:
            os.close(fd)
