"""The gateway's API key file, followed while the gateway runs: a revoked key stops working without a restart.

:class:`ReloadingKeyStore` answers like a :class:`~gateway.auth.KeyStore` (``resolve``,
``key_for_tier``, ``enabled``). On a call, at most every ``check_interval_s`` (1 s),
it compares the file's ``stat`` (mtime, ctime, size, inode) with the one it last
read and reloads on a change. A file that no longer parses (or vanished) is logged
as an error and the keys loaded before stay in force, so a bad edit never opens
the gateway or locks everyone out; the next change is tried again. Writing the
new file elsewhere and renaming it over the old one avoids serving a half-written
file for up to a second.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from gateway.auth import KeyStore, load_key_file
from gateway.config import TierPolicy

log = logging.getLogger(__name__)

_Signature = tuple[int, int, int, int]


def _signature(path: Path) -> _Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


def _describe(exc: Exception) -> str:
    """The error without the file's text: a YAML error's snippet could show a key in the log."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        return f"{type(exc).__name__}: {getattr(exc, 'problem', '') or 'malformed YAML'} at line {mark.line + 1}"
    return f"{type(exc).__name__}: {exc}"


class ReloadingKeyStore:
    """A key file's :class:`KeyStore`, reloaded when the file changes (checked at most every ``check_interval_s``)."""

    def __init__(self, path: str | os.PathLike, default_tier: str = "paying",
                 tiers: dict[str, TierPolicy] | None = None, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if check_interval_s < 0:
            raise ValueError(f"check_interval_s must be >= 0, got {check_interval_s}")
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._default_tier, self._tiers = default_tier, tiers
        self._clock = clock
        # NOTE: stat before reading, so a change that lands during the read is seen at the next check
        self._seen = _signature(self.path)
        self._store = load_key_file(self.path, default_tier, tiers)  # a bad file at start-up is fatal
        self._next_check_s = clock() + check_interval_s
        self.num_reloads = 0
        self.num_reload_errors = 0

    # ------------------------------------------------------------ the KeyStore interface
    @property
    def store(self) -> KeyStore:
        """The keys in force (after a reload if the file changed and its check is due)."""
        now = self._clock()
        if now >= self._next_check_s:
            self._next_check_s = now + self.check_interval_s
            self.reload_if_changed()
        return self._store

    @property
    def enabled(self) -> bool:
        return self._store.enabled

    def resolve(self, authorization: str | None) -> TierPolicy:
        """As :meth:`KeyStore.resolve`, against the file's current keys."""
        return self.store.resolve(authorization)

    def key_for_tier(self, tier: str) -> str | None:
        return self.store.key_for_tier(tier)

    def __len__(self) -> int:
        return len(self._store.keys)

    # ------------------------------------------------------------ reloading
    def reload_if_changed(self) -> bool:
        """Reload now if the file changed since it was last read; True when new keys are in force."""
        sig = _signature(self.path)
        if sig == self._seen:
            return False
        self._seen = sig  # a broken file is reported once; its next change is tried again
        if sig is None:
            self.num_reload_errors += 1
            log.error("API key file %s is gone; keeping the %d keys loaded before", self.path, len(self))
            return False
        try:
            store = load_key_file(self.path, self._default_tier, self._tiers)
        except Exception as exc:  # noqa: BLE001 - any unreadable or malformed file keeps the old keys
            self.num_reload_errors += 1
            log.error("API key file %s no longer loads (%s); keeping the %d keys loaded before",
                      self.path, _describe(exc), len(self))
            return False
        self._store = store
        self.num_reloads += 1
        log.info("API key file %s reloaded: %d keys", self.path, len(store.keys))
        return True


__all__ = ["ReloadingKeyStore"]
