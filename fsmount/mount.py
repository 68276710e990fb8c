"""Process behaviour of ``diskrsync mount`` / ``umount``: checks, daemon, readiness, signals.

``mount_main`` checks the mount point and FUSE first (clear one-line errors), then either serves
in the foreground (``foreground=True``: logs to stderr, returns when unmounted) or forks: the
child opens the image, mounts, and reports readiness through a pipe; the parent returns only
once the mount is ready, else raises the child's error again (same class and exit code). SIGINT
and SIGTERM unmount cleanly; so does ``umount_main`` (``fusermount3 -u``).

Nothing here prints or chooses an exit code: failures are ``DiskrsyncError`` raised to the CLI.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import logging.handlers
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pyfuse3
import trio

from diskrsync.base.errors import (
    EXIT_INTERRUPTED,
    DiskrsyncError,
    LocalError,
    UsageError,
    error_from_wire,
)
from diskrsync.compression.api import DiskImage
from diskrsync.fsmount.cache import DEFAULT_CACHE_SIZE, ChunkCache
from diskrsync.fsmount.fuse import REFRESH_INTERVAL, DiskOperations
from diskrsync.fsmount.reader import ChunkReader
from diskrsync.fsmount.vfs import MountVFS

log = logging.getLogger("diskrsync.fsmount")

FSNAME = "diskrsync"
READ_AHEAD_KB = 1024
M_ARENA_MAX = -8  # glibc's malloc.h

ImageOpener = Callable[[], DiskImage]


class MountPointError(UsageError):
    """The mount point cannot be used as given (missing, not a directory, in use)."""


class StaleMountError(LocalError):
    """A FUSE mount whose process died is still attached to the mount point."""


class FuseUnavailableError(LocalError):
    """FUSE cannot be used here (/dev/fuse missing or not accessible, fusermount3 missing)."""


# --- checks -----------------------------------------------------------------------------------


def is_stale_mount(path: str) -> bool:
    """True when ``path`` is a FUSE mount whose server is gone (ENOTCONN).

    statvfs, not stat: the kernel may answer a stat from cached attributes for a while after
    the server died, but it always asks the server for statfs.
    """
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def _stale_error(path: str) -> StaleMountError:
    return StaleMountError(
        f"{path} is a stale mount left by a mount process that died (Transport endpoint is not "
        f"connected); unmount it first with `diskrsync umount {path}` "
        f"(or `fusermount3 -u -z {path}`)"
    )


def check_mountpoint(path: str) -> str:
    """The absolute mount point, or a clear error why it cannot be mounted on."""
    if is_stale_mount(path):
        raise _stale_error(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountPointError(f"mount point {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise _stale_error(path) from None
        if exc.errno == errno.EACCES:
            raise LocalError(f"no permission to reach mount point {path}") from None
        raise LocalError(f"cannot use mount point {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountPointError(f"mount point {path} is not a directory")
    if os.path.ismount(path):
        raise MountPointError(
            f"{path} is already a mount point; unmount it first (`diskrsync umount {path}`) "
            f"or choose another directory"
        )
    if os.geteuid() != 0 and not os.access(path, os.W_OK):
        raise LocalError(f"no permission to mount on {path} (FUSE needs write access to it)")
    return os.path.abspath(path)


def check_fuse(*, allow_other: bool = False) -> None:
    """Raise ``FuseUnavailableError`` (or ``UsageError``) when FUSE cannot be used."""
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailableError(
            "/dev/fuse is missing: load the fuse module (`modprobe fuse`), or in a container "
            "pass the device in (e.g. `--device /dev/fuse`)"
        )
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise FuseUnavailableError("no permission to open /dev/fuse (not root, not in its group)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise FuseUnavailableError("fusermount3 is not installed (Debian: apt install fuse3)")
    if allow_other and os.geteuid() != 0 and not _user_allow_other():
        raise UsageError("--allow-other needs the line `user_allow_other` in /etc/fuse.conf")


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


# --- serving ----------------------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def _mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the mount at ``mountpoint`` from /proc/self/mountinfo (no stat: a
    stat of the mount would wait for our own, not yet running, request loop)."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape_mountinfo(fields[4]) == mountpoint:
                    found = fields[2]  # the last one listed is the top of the stack
    except OSError:
        return None
    return found


def raise_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> bool:
    """Raise the mount's read_ahead_kb (bigger sequential requests); False when not possible."""
    device = _mount_device(mountpoint)
    if device is None:
        return False
    path = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(path) as f:
            if int(f.read().strip() or 0) >= kb:
                return True
        with open(path, "w") as f:
            f.write(str(kb))
    except (OSError, ValueError) as exc:
        log.debug("could not raise %s: %s", path, exc)
        return False
    return True


def one_malloc_arena() -> bool:
    """Make every thread of this process allocate from the C library's main arena.

    Read-ahead threads allocate the span buffers and the loop's thread frees them (cache
    evictions); with glibc's default arena per thread, the memory freed stayed spread over the
    threads' arenas and the mount's peak memory grew to 340-520 MiB with the default 256 MiB
    cache (328 MiB with one arena; measured by ``tests/bench/bench_mount.py``). False where
    there is no ``mallopt`` (not glibc): nothing else changes."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


def mount_options(*, allow_other: bool) -> set[str]:
    options = {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    return options


def serve(
    image: DiskImage,
    mountpoint: str,
    *,
    generation: int | None = None,
    allow_other: bool = False,
    cache_size: int = DEFAULT_CACHE_SIZE,
    on_ready: Callable[[], None] | None = None,
    refresh_interval: float = REFRESH_INTERVAL,
) -> None:
    """Mount ``image`` on ``mountpoint`` in this process; return once it is unmounted.

    Raises a ``DiskrsyncError`` when it cannot mount. SIGINT/SIGTERM unmount.
    """
    one_malloc_arena()  # before trio starts any worker thread
    trio.run(
        _serve, image, mountpoint, generation, allow_other, cache_size, on_ready,
        refresh_interval,
    )


async def _serve(
    image: DiskImage,
    mountpoint: str,
    generation: int | None,
    allow_other: bool,
    cache_size: int,
    on_ready: Callable[[], None] | None,
    refresh_interval: float,
) -> None:
    vfs = MountVFS(generation=generation)
    reader = ChunkReader(ChunkCache(cache_size))
    ops = DiskOperations(image, vfs, reader)
    try:
        await ops.refresh()
        numbers = sorted(vfs.generation_numbers())
        if generation is not None and generation not in numbers:
            retained = ", ".join(map(str, numbers)) or "none"
            raise UsageError(f"generation {generation} is not in the image (retained: {retained})")
        if not numbers:
            log.warning("the image holds no committed generation yet")
        try:
            pyfuse3.init(ops, mountpoint, mount_options(allow_other=allow_other))
        except RuntimeError as exc:
            raise LocalError(f"cannot mount on {mountpoint}: {exc}") from None
        ops.notify = True

        async def when_serving() -> None:
            # A stat through the mount returns once the kernel's INIT handshake is done and our
            # loop answers: only then is the mount ready, and only then does read_ahead_kb stick
            # (the INIT reply lowers it to what the kernel proposed).
            await trio.to_thread.run_sync(os.stat, mountpoint)
            raised = raise_read_ahead(mountpoint)
            log.info(
                "mounted on %s (generations %s, showing %s; read_ahead_kb %s)", mountpoint,
                ", ".join(map(str, numbers)) or "none", vfs.top_generation,
                READ_AHEAD_KB if raised else "unchanged",
            )
            if on_ready is not None:
                on_ready()

        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(_watch_signals)
                reader.start_readahead(nursery)
                nursery.start_soon(ops.refresh_loop, refresh_interval)
                nursery.start_soon(when_serving)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            ops.notify = False
            pyfuse3.close(unmount=True)
            log.info("unmounted %s; served %s", mountpoint, reader.stats.summary())
    finally:
        vfs.close()


async def _watch_signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


# --- foreground / background --------------------------------------------------------------


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _read_line(fd: int) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        try:
            part = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not part:
            break
        buf += part
    return buf.decode(errors="replace").strip()


def reported_error(line: str) -> DiskrsyncError:
    """The error a daemon reported as ``ERROR <code> <class> <message>``, raised again in the
    parent: same category (see ``error_from_wire``), same exit code."""
    code_text, _, rest = line.removeprefix("ERROR ").partition(" ")
    name, _, message = rest.partition(" ")
    code = int(code_text) if code_text.isdigit() else DiskrsyncError.exit_code
    return error_from_wire(name, message or "the mount failed", from_peer=False, exit_code=code)


def _report(exc: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for any failure of the daemon."""
    if isinstance(exc, DiskrsyncError):
        return exc.exit_code, " ".join(str(exc).split())
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    return DiskrsyncError.exit_code, " ".join(f"{type(exc).__name__}: {exc}".split())


def mount_image(
    image: DiskImage | ImageOpener,
    mountpoint: str,
    *,
    foreground: bool = False,
    generation: int | None = None,
    allow_other: bool = False,
    cache_size: int = DEFAULT_CACHE_SIZE,
    ready_fd: int | None = None,
    on_ready: Callable[[], None] | None = None,
    log_file: str | None = None,
    verbose: bool = False,
    refresh_interval: float = REFRESH_INTERVAL,
) -> None:
    """Mount and serve; raises ``DiskrsyncError`` when the mount cannot be made.

    ``image`` is best given as an opener: in the background the child process opens it after
    the fork (no file or thread state crosses the fork). ``ready_fd``: a file descriptor that
    gets "READY <pid>\\n" once the mount is ready (and is then closed); ``on_ready``: a callback
    for the same moment. In the foreground this returns once unmounted (also by SIGINT or
    SIGTERM); in the background the parent returns once the child's mount is ready, and raises
    the child's error again when it could not mount.
    """
    mountpoint = check_mountpoint(mountpoint)
    check_fuse(allow_other=allow_other)
    options: dict[str, Any] = {
        "generation": generation, "allow_other": allow_other, "cache_size": cache_size,
        "refresh_interval": refresh_interval,
    }

    def ready() -> None:
        if ready_fd is not None:
            _write_all(ready_fd, f"READY {os.getpid()}\n".encode())
            os.close(ready_fd)
        if on_ready is not None:
            on_ready()

    if foreground:
        opened = image() if callable(image) else image
        try:
            serve(opened, mountpoint, on_ready=ready, **options)
        finally:
            if callable(image):
                opened.close()
        return

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        code = _daemon(image, mountpoint, wfd, ready, (log_file, verbose), options)
        os._exit(code)
    os.close(wfd)
    try:
        line = _read_line(rfd)
    finally:
        os.close(rfd)
    if line.startswith("READY"):
        return
    _, status = os.waitpid(pid, 0)
    if line.startswith("ERROR "):
        raise reported_error(line)
    code = os.waitstatus_to_exitcode(status)
    raise LocalError(
        f"the mount process ended before the mount was ready (status {code})",
        exit_code=code if code > 0 else DiskrsyncError.exit_code,
    )


def _daemon(
    image: DiskImage | ImageOpener,
    mountpoint: str,
    wfd: int,
    ready: Callable[[], None],
    logging_options: tuple[str | None, bool],
    options: dict[str, Any],
) -> int:
    reported = False

    def daemon_ready() -> None:
        nonlocal reported
        reported = True
        _write_all(wfd, f"READY {os.getpid()}\n".encode())
        os.close(wfd)
        ready()

    try:
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        log_file, verbose = logging_options
        _setup_logging(foreground=False, log_file=log_file, verbose=verbose)
        opened = image() if callable(image) else image
        try:
            serve(opened, mountpoint, on_ready=daemon_ready, **options)
        finally:
            if callable(image):
                opened.close()
        return 0
    except BaseException as exc:  # report anything to the waiting parent
        code, message = _report(exc)
        name = type(exc).__name__ if isinstance(exc, DiskrsyncError) else "DiskrsyncError"
        if not reported:
            _write_all(wfd, f"ERROR {code} {name} {message}\n".encode())
        log.error("mount failed: %s", message)
        return code


def _setup_logging(*, foreground: bool, log_file: str | None = None, verbose: bool = False) -> None:
    logger = logging.getLogger("diskrsync")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    handler: logging.Handler
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("diskrsync mount: %(levelname)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("diskrsync[%(process)d]: %(message)s"))
    else:
        handler = logging.NullHandler()
    logger.addHandler(handler)


def mount_main(image_opener: ImageOpener, mountpoint: str, **options: Any) -> None:
    """``diskrsync mount``: options as for ``mount_image`` (foreground, generation,
    allow_other, cache_size, log_file, verbose...). Raises ``DiskrsyncError``."""
    if options.get("foreground"):
        _setup_logging(foreground=True, log_file=options.get("log_file"),
                       verbose=bool(options.get("verbose")))
    mount_image(image_opener, mountpoint, **options)


# --- unmounting -------------------------------------------------------------------------------


def umount_mountpoint(path: str) -> None:
    """Unmount a diskrsync mount (``fusermount3 -u``; ``-u -z`` for a stale one)."""
    stale = is_stale_mount(path)
    if not stale:
        if not os.path.exists(path):
            raise MountPointError(f"{path} does not exist")
        if not os.path.ismount(path):
            raise MountPointError(f"{path} is not a mount point")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        if os.geteuid() != 0:
            raise FuseUnavailableError("fusermount3 is not installed (Debian: apt install fuse3)")
        cmd = ["umount", "-l"] if stale else ["umount"]
    else:
        cmd = [tool, "-u", "-z"] if stale else [tool, "-u"]
    result = subprocess.run([*cmd, path], capture_output=True, text=True)
    if result.returncode != 0 and not stale and is_stale_mount(path):
        result = subprocess.run([*cmd, "-z", path], capture_output=True, text=True)
    if result.returncode != 0:
        detail = " ".join(result.stderr.split()) or f"{cmd[0]} exited with {result.returncode}"
        if "busy" in detail.lower():
            raise LocalError(
                f"cannot unmount {path}: it is busy (a file on it is open, or a loop device uses "
                f"one: see `losetup -a`, unmount and detach it first)"
            )
        raise LocalError(f"cannot unmount {path}: {detail}")


def umount_main(mountpoint: str) -> None:
    """``diskrsync umount``; raises ``DiskrsyncError``."""
    umount_mountpoint(mountpoint)
