"""The lock that keeps two trainers off one checkpoint directory (docs/training.md).

``checkpoint_dir/kspike.lock`` holds the host, pid, boot id, pid namespace and start time of
the trainer that owns the directory; its modification time is a heartbeat, refreshed while the
trainer runs. A lock is stale, and is taken over, when its heartbeat is older than
``stale_after`` seconds, when its host is this host and the host rebooted since (another boot
id), or when its process is known dead (same host, boot and pid namespace, pid gone). The pid
test is only used where pids are comparable; the heartbeat works across hosts and containers.

Example:

>>> import tempfile
>>> directory = tempfile.mkdtemp()
>>> with CheckpointLock(directory) as lock:
...     lock.held
True
>>> lock.held
False
"""
import atexit
import datetime
import json
import os
import socket
import threading
import time
import uuid
import warnings

__all__ = ["CheckpointLock", "CheckpointDirectoryInUseError", "LOCK_NAME", "stale_reason",
           "pid_alive"]

LOCK_NAME = "kspike.lock"


class CheckpointDirectoryInUseError(RuntimeError):
    """Another trainer holds the checkpoint directory's lock."""


def _read_text(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _identity():
    """Who this process is, in the terms a lock file records."""
    namespace = None
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
            "pid_namespace": namespace}


def pid_alive(pid):
    """False when no process ``pid`` exists in this pid namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def stale_reason(info, age, stale_after, me=None):
    """Why the lock ``info`` (its JSON, possibly {}) with a heartbeat ``age`` seconds old is
    stale, or None if its owner may still run.

    >>> stale_reason({"host": "a"}, 5.0, 60.0, {"host": "b"}) is None
    True
    >>> stale_reason({"host": "a"}, 90.0, 60.0, {"host": "b"})
    'its heartbeat stopped 90 s ago'
    """
    me = _identity() if me is None else me
    if age > stale_after:
        return f"its heartbeat stopped {age:.0f} s ago"
    if info.get("host") != me["host"]:
        return None
    if info.get("boot_id") and me["boot_id"] and info["boot_id"] != me["boot_id"]:
        return "this host rebooted since"
    if (info.get("pid_namespace") == me["pid_namespace"] and isinstance(info.get("pid"), int)
            and not pid_alive(info["pid"])):
        return f"process {info['pid']} is gone"
    return None


class CheckpointLock:
    """Exclusive use of a checkpoint directory by one trainer.

    Args:
        directory: the checkpoint directory (created if missing).
        stale_after: seconds without heartbeat after which a lock counts as abandoned.
        heartbeat_every: seconds between heartbeats of the background thread (also refreshed
            by ``refresh``, at each training step and checkpoint).
    """

    def __init__(self, directory, stale_after=600.0, heartbeat_every=30.0):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.stale_after = float(stale_after)
        self.heartbeat_every = float(heartbeat_every)
        self.held = False
        self._token = None
        self._stop = threading.Event()
        self._thread = None
        self._last_refresh = 0.0

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *args):
        self.release()
        return False

    def acquire(self):
        """Takes the lock; raises ``CheckpointDirectoryInUseError`` if a live trainer has it."""
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            self._take_over_if_stale()
        raise CheckpointDirectoryInUseError(
            f"checkpoint directory {self.directory} is in use: its lock {self.path} keeps "
            "changing owner.")

    def _create(self):
        info = dict(_identity(), token=uuid.uuid4().hex,
                    started=datetime.datetime.now(datetime.timezone.utc).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"))
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
            handle.flush()
            os.fsync(handle.fileno())
        self.held, self._token = True, info["token"]
        atexit.register(self.release)
        return True

    def _take_over_if_stale(self):
        try:
            age = time.time() - os.stat(self.path).st_mtime
            with open(self.path) as handle:
                text = handle.read()
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            info = json.loads(text)
        except ValueError:
            info = {}  # being written or damaged: only its heartbeat can tell
        reason = stale_reason(info if isinstance(info, dict) else {}, age, self.stale_after)
        owner = f"{info.get('host', '?')}/{info.get('pid', '?')}"
        if reason is None:
            raise CheckpointDirectoryInUseError(
                f"checkpoint directory {self.directory} is in use by {owner} since "
                f"{info.get('started', '?')} (lock {self.path}, heartbeat {age:.0f} s ago). "
                f"Wait for that run to end, or stop it; a lock without heartbeat for "
                f"{self.stale_after:.0f} s is taken over.")
        # Renaming first: of two trainers taking over at once, only one rename succeeds.
        aside = f"{self.path}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        os.remove(aside)
        warnings.warn(f"Took over the stale lock of {owner} on checkpoint directory "
                      f"{self.directory} ({reason}).", stacklevel=6)

    def _start_heartbeat(self):
        self._stop.clear()

        def beat():
            while not self._stop.wait(self.heartbeat_every):
                self.refresh(force=True)
        self._thread = threading.Thread(target=beat, name="kspike-lock-heartbeat", daemon=True)
        self._thread.start()

    def refresh(self, force=False):
        """Renews the heartbeat (at most once a second unless ``force``)."""
        now = time.time()
        if not self.held or (not force and now - self._last_refresh < 1.0):
            return
        self._last_refresh = now
        try:
            os.utime(self.path)
        except OSError:
            pass  # a vanished lock is reported by the next acquire, not in the middle of a step

    def release(self):
        """Removes the lock if this object still owns it."""
        if not self.held:
            return
        self.held = False
        self._stop.set()
        try:
            with open(self.path) as handle:
                if json.load(handle).get("token") == self._token:
                    os.remove(self.path)
        except (OSError, ValueError):
            pass
        atexit.unregister(self.release)
