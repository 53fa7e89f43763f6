"""One build at a time in an object store: a lease, the object-store counterpart of the local
build lock (`manifest.acquire_build_lock`, an fcntl lock on a file in the cache folder).

    lease = acquire_lease(store)    # CacheBusyError naming the holder when another build has it
    ...                             # a thread renews it every LEASE_SECONDS / 4
    lease.release()

Objects `featurecache/leases/<n>.json` (n zero-padded to 12 digits), each created only if absent
(`If-None-Match: *` on S3): the one with the largest n is the lease, holding {"holder": "pid P
on HOST", "host", "pid", "token", "expires": unix seconds, "released": bool}. Its holder renews
`expires` (rewriting its own object) and marks it released at the end. Another build may take
the lease when the newest one is released, expired, or held by a process of this host that no
longer exists (a killed driver: rerunning the command takes over at once; a driver killed on
another host is taken over once its lease expires, LEASE_SECONDS after its last renewal). It
takes it by creating n + 1 only if absent, so of two builds racing for it exactly one wins; the
loser sees the winner's lease and is refused. Hosts' clocks should agree within a few seconds.
A holder that finds a newer lease (it stalled past its expiry and was taken over) is `lost`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Final

from featurecache.errors import CacheBusyError
from featurecache.store import Store

__all__ = ["LEASE_PREFIX", "LEASE_SECONDS", "Lease", "acquire_lease", "holds_only_leases"]

LEASE_PREFIX: Final = "featurecache/leases/"
LEASE_SECONDS: Final = 60.0  # a lease not renewed for this long is free to take


def _key(n: int) -> str:
    return f"{LEASE_PREFIX}{n:012d}.json"


def _newest(store: Store) -> tuple[int, dict[str, Any] | None]:
    """(n, content) of the newest lease object; (-1, None) when there is none."""
    names = [k for k, _ in store.list(LEASE_PREFIX) if k.endswith(".json")]
    if not names:
        return -1, None
    newest = max(names)
    try:
        content = json.loads(store.read(newest))
    except (FileNotFoundError, ValueError):  # deleted meanwhile, or torn: treat as free
        content = {"released": True}
    return int(newest[len(LEASE_PREFIX) : -len(".json")]), content


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _free(content: dict[str, Any], now: float) -> bool:
    """Whether a lease may be taken: released, expired, or its holder died on this host."""
    if content.get("released") or float(content.get("expires", 0)) < now:
        return True
    same_host = content.get("host") == socket.gethostname()
    return same_host and not _pid_alive(int(content.get("pid", -1)))


class Lease:
    """A held lease; renewed by a daemon thread until `release()`."""

    def __init__(self, store: Store, n: int, seconds: float) -> None:
        self.store, self.n, self.seconds = store, n, seconds
        self.token = secrets.token_hex(8)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def content(self, *, released: bool = False) -> bytes:
        host, pid = socket.gethostname(), os.getpid()
        return json.dumps(
            {"holder": f"pid {pid} on {host}", "host": host, "pid": pid, "token": self.token,
             "expires": time.time() + self.seconds, "released": released}
        ).encode()  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="featurecache-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4) and not self.lost:
            with contextlib.suppress(Exception):  # a failed renewal is retried next time
                self.renew()

    def renew(self) -> None:
        """Push the expiry LEASE_SECONDS ahead; `lost` instead when a newer lease exists (ours
        expired and another build took over)."""
        if self.store.exists(_key(self.n + 1)):
            self.lost = True
            return
        self.store.put(_key(self.n), self.content())

    def release(self) -> None:
        """Stop renewing and mark the lease released (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            with contextlib.suppress(Exception):
                self.store.put(_key(self.n), self.content(released=True))


def acquire_lease(store: Store, seconds: float = LEASE_SECONDS) -> Lease:
    """Take the build lease of the cache in `store` without waiting, and start renewing it.
    CacheBusyError naming the holder when another live build holds it."""
    n, content = _newest(store)
    if content is None or _free(content, time.time()):
        lease = Lease(store, n + 1, seconds)
        if store.create(_key(n + 1), lease.content()):
            for old in range(max(0, n - 8), n + 1):  # keep the prefix small (best effort)
                store.delete(_key(old))
            lease.start()
            return lease
        n, content = _newest(store)  # another build took it first
    holder = (content or {}).get("holder", "another process")
    until = time.strftime("%H:%M:%S", time.localtime(float((content or {}).get("expires", 0))))
    raise CacheBusyError(
        f"Expected no other build writing {store.location!r}, got one running ({holder}; its "
        f"lease {_key(n)} runs until {until} unless renewed); wait for it to finish, then rerun "
        f"this command: it resumes and writes only what is left (do not delete the cache: that "
        f"would destroy the running build's work)"
    )


def holds_only_leases(store: Store) -> bool:
    """Whether every object under the store's root is a lease object (or there is none): a
    location a build has claimed but not yet created its cache in."""
    return all(key.startswith(LEASE_PREFIX) for key, _ in store.list(""))
