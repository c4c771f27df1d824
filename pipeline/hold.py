"""One job at a time on a run folder: the hold.

Every job takes the hold on its run folder (``<run.root>/<run.name>``) before it writes there, and keeps it until it
ends; a second job on the same run folder is refused with one line naming the holder (:class:`HeldElsewhere`).
When ``run.storage`` lies outside the run folder, the run's checkpoints there are held too, under
``<run.storage>/<run.name>.hold.json``. Ray workers never take the hold: the driver holds for the whole job
(``jobs.pipeline`` for all its stages), and a process that holds a place already takes it again at no cost.

- **A local folder** (or a shared filesystem with locks, as NFSv4 has): an exclusive ``flock`` on ``hold.lock``
  (the filelock library), which the kernel drops when the holder's process ends, however it ends: a job killed
  with SIGKILL leaves no hold behind. ``hold.json`` beside it names the holder; a clean release deletes it, so
  finding it at the next take means the previous job died holding the folder, and the taker says so in one line.
- **An s3:// folder**: a lease object ``hold.json``, created with a conditional write (``If-None-Match: *``) and
  renewed every quarter of its lease (:data:`LEASE_S`) with ``If-Match`` on its ETag. A lease is stale when it
  was not renewed for its lease, by the store's own clock (the response's ``Date`` against the object's
  ``LastModified``), or at once when its holder ran on this host and its process is gone; a stale lease is taken
  over with ``If-Match`` on the ETag seen, so two takers cannot both win. A store that ignores conditional writes
  is refused with one line, since it could let two jobs in.

A hold is released when the job ends: :class:`Hold` is a context manager, jobs release in ``finally``
(pipeline/cli.py ``main_guard``), and :func:`release_all` also runs at exit.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import sys
import threading
import time

from pipeline import storage
from pipeline.config import RunConfig

LEASE_S = 60.0  # seconds an s3:// hold lasts without renewal before another job may take it over
_INFO = "hold.json"
_LOCK = "hold.lock"


class HeldElsewhere(ValueError):
    """Another live job holds the place: one line naming it (job, pid, host, since) and what to do."""


def _now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _me(job: str, lease_s: float | None = None) -> dict:
    """Who holds: this process, named so that a person can find it."""
    import psutil

    me = {"job": job, "pid": os.getpid(), "host": socket.gethostname(), "since": _now_text(),
          "started": psutil.Process().create_time()}
    return me if lease_s is None else {**me, "lease_s": lease_s}


def _who(holder: dict | None) -> str:
    if not holder:
        return "another job (it has not written its name yet)"
    return (f"{holder.get('job', 'a job')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')})")


def _alive_here(holder: dict) -> bool:
    """Whether the holder is a process of this host that still runs (the same pid and start time)."""
    import psutil

    if holder.get("host") != socket.gethostname():
        return True  # not ours to judge: another host's lease expires instead
    try:
        process = psutil.Process(int(holder.get("pid", -1)))
        started = process.create_time()
        if process.status() == psutil.STATUS_ZOMBIE:  # ended, not yet reaped by its parent
            return False
    except (psutil.Error, ValueError, TypeError):
        return False
    return abs(started - float(holder.get("started", started))) < 1.0  # a reused pid is another process


def _refusal(place: str, holder: dict | None) -> HeldElsewhere:
    kill = f"; or stop it (kill {holder['pid']} on {holder['host']})" if holder and "pid" in holder else ""
    return HeldElsewhere(f"{place} is held by {_who(holder)}: a run folder takes one job at a time. Wait for that job "
                         f"to end{kill}; or give this job its own run: --set run.name=<another name>")


def _took_over(place: str, holder: dict | None) -> None:
    print(f"[distil] {place}: took over the hold of {_who(holder)}, which ended without releasing it (killed or "
          "crashed); its finished stages are kept", flush=True)


class _LocalPlace:
    """An exclusive flock on ``<folder>/<stem>.lock`` (the filelock library's descriptor lock), with ``<stem>.json``
    naming the holder."""

    def __init__(self, folder: str, stem: str, name: str):
        self.name = name
        self.lock_path = os.path.join(folder, f"{stem}.lock")
        self.info_path = os.path.join(folder, f"{stem}.json")
        self.fd: int | None = None

    def acquire(self, job: str, lease_s: float) -> None:
        try:
            os.makedirs(os.path.dirname(self.lock_path), exist_ok=True)
            fd = self._lock()
            if fd is None:
                raise _refusal(self.name, self._holder_of_a_held_lock())
            self.fd = fd
            previous = self._read()
            if previous:
                _took_over(self.name, previous)
            storage.write_json(self.info_path, _me(job))
        except OSError as e:
            self.release()
            raise ValueError(f"cannot hold {self.name}: {e.strerror or e} ({self.lock_path}): pick a writable run.root, "
                             "e.g. --set run.root=$HOME/distil-runs") from None

    def _lock(self) -> int | None:
        """The locked descriptor of the lock file, or None when another process holds it."""
        import filelock

        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by programs a job starts
            if not filelock.lock_descriptor(fd, blocking=False):
                os.close(fd)
                return None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.lock_path)):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)  # the file was deleted or replaced after it was opened: lock the one there now

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.info_path)  # first: a holder killed between the two leaves no name behind
        except FileNotFoundError:
            pass
        os.close(self.fd)  # the lock goes with the last descriptor of it
        self.fd = None

    def forget_in_child(self) -> None:
        """In a child forked by the holder: close the child's copy of the descriptor, leaving the lock to the parent
        (a forked child that outlived a killed job would otherwise keep the folder held)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.info_path)
        except storage.DamagedFile:
            return {}

    def _holder_of_a_held_lock(self) -> dict | None:
        """The holder's name; it writes it just after it locks, so wait a moment for it."""
        for _ in range(20):
            holder = self._read()
            if holder and _alive_here(holder):
                return holder
            time.sleep(0.05)
        return holder


class _S3Place:
    """A lease object ``<folder>/<stem>.json`` with conditional writes; a thread renews it."""

    def __init__(self, folder: str, stem: str, name: str):
        self.name = name
        self.uri = storage.join(folder, f"{stem}.json")
        self.bucket, self.key = storage.split_s3(self.uri)
        self.etag: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, job: str, lease_s: float) -> None:
        from botocore.exceptions import ClientError

        self._client = client = storage.s3_client()
        self._body = _me(job, lease_s)
        for _ in range(20):
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except ClientError as e:
                if _code(e) not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                    raise
            try:
                got = client.get_object(Bucket=self.bucket, Key=self.key)
            except client.exceptions.NoSuchKey:
                continue  # released in between: create it again
            holder, age_s = _lease_body(got), _age_s(got)
            if age_s < float(holder.get("lease_s", LEASE_S)) and _alive_here(holder):
                raise _refusal(self.name, holder)
            try:
                self.etag = self._put(IfMatch=got["ETag"])
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"):
                    continue  # another job took it over first: look again
                raise
            _took_over(self.name, holder)
            break
        else:
            raise ValueError(f"could not take the hold on {self.name}: other jobs kept taking it; try again")
        self._refuse_a_store_that_ignores_conditions()
        self._thread = threading.Thread(target=self._renew, args=(float(lease_s),), name="distil-hold", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self.etag is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.key)
            if head["ETag"] == self.etag:  # still ours: no one took it over while this job was not heard from
                self._client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 -- a lease left behind expires; the job's own result stands
            print(f"[distil] {self.name}: could not release the hold ({e}); it expires on its own", flush=True)
        self.etag = None

    def forget_in_child(self) -> None:
        """In a child forked by the holder: the parent keeps renewing and releases; the child does neither."""
        self.etag, self._thread = None, None

    def _put(self, **condition) -> str:
        body = json.dumps({**self._body, "renewed": _now_text()}, indent=2, sort_keys=True).encode()
        return self._client.put_object(Bucket=self.bucket, Key=self.key, Body=body, **condition)["ETag"]

    def _refuse_a_store_that_ignores_conditions(self) -> None:
        """A write conditional on an ETag that no object has must fail; a store that lets it through would also
        let two jobs hold one folder."""
        from botocore.exceptions import ClientError

        try:
            self.etag = self._put(IfMatch='"distil-probe-0000"')
        except ClientError as e:
            if _code(e) in ("PreconditionFailed", "412"):
                return
            detail = _code(e)
        else:
            detail = "a write with a wrong If-Match succeeded"
        self._client.delete_object(Bucket=self.bucket, Key=self.key)
        self.etag = None
        raise ValueError(f"the S3 store at {storage.endpoint_url() or 'AWS'} does not honour conditional writes "
                         f"({detail}), so it cannot keep two jobs off {self.name}: use a store that does (AWS S3, "
                         "MinIO), or put run.root and run.storage on a local or shared filesystem")

    def _renew(self, lease_s: float) -> None:
        from botocore.exceptions import ClientError

        warned = False
        while not self._stop.wait(max(lease_s / 4, 0.2)):
            try:
                self.etag = self._put(IfMatch=self.etag)
                warned = False
            except ClientError as e:
                if _code(e) in ("PreconditionFailed", "NoSuchKey", "412", "404"):
                    self.lost = True
                    print(f"[distil] {self.name}: this job lost its hold (it was not heard from for {lease_s:.0f} s, and "
                          "another job took the folder over): stop this job, the other one owns the run now", flush=True)
                    return
                if not warned:
                    print(f"[distil] {self.name}: could not renew the hold ({_code(e)}); retrying", flush=True)
                    warned = True
            except Exception as e:  # noqa: BLE001 -- a network error: the lease holds until it expires; retry
                if not warned:
                    print(f"[distil] {self.name}: could not renew the hold ({e}); retrying", flush=True)
                    warned = True


def _code(e) -> str:
    return str(e.response.get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""


def _lease_body(got: dict) -> dict:
    try:
        body = json.loads(got["Body"].read())
        return body if isinstance(body, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _age_s(got: dict) -> float:
    """Seconds since the object was last written, by the store's clock (its Date header against LastModified)."""
    import email.utils

    date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = email.utils.parsedate_to_datetime(date) if date else datetime.datetime.now(datetime.timezone.utc)
    return (now - got["LastModified"]).total_seconds()


# ---- the holds of this process ----------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # place → [its _LocalPlace or _S3Place, how many takes]
_GUARD = threading.Lock()


class Hold:
    """The holds one :func:`take` gave: a context manager; :meth:`release` gives them back (idempotent)."""

    def __init__(self, places: list[str]):
        self.places = places

    def release(self) -> None:
        """Give back each place this take holds; a place another take of this process holds too stays held."""
        with _GUARD:
            for place in self.places:
                entry = _HELD.get(place)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] <= 0:
                    del _HELD[place]
                    entry[0].release()
            self.places = []

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def places(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(folder, file stem, name in messages) of what a job on ``cfg`` holds: its run folder (``hold.*``), and
    ``run.storage`` (``<run.name>.hold.*``) when it lies outside the run folder."""
    out = [(cfg.run_dir, "hold", f"run folder {cfg.run_dir}")]
    inside = cfg.storage_path.rstrip("/").startswith(cfg.run_dir.rstrip("/") + "/")
    if cfg.run.storage and not inside:
        out.append((cfg.run.storage, f"{cfg.run.name}.hold", f"run.storage {cfg.run.storage} for run {cfg.run.name}"))
    return out


def take(cfg: RunConfig, *, job: str | None = None, lease_s: float = LEASE_S) -> Hold:
    """Hold ``cfg``'s run folder (and its outside ``run.storage``) for this process, or raise
    :class:`HeldElsewhere` (a ValueError, one line) when a live job holds it. ``job`` names this job in the hold
    (default: the running module); ``lease_s`` is how long an s3:// hold outlives a holder that stops renewing it.
    Raises ValueError for a folder that cannot be written, or an S3 store without conditional writes."""
    job = job or _running_job()
    taken: list[str] = []
    try:
        for folder, stem, name in places(cfg):
            key = storage.join(folder, stem)
            with _GUARD:
                _register_release_at_exit()
                if key in _HELD:
                    _HELD[key][1] += 1
                else:
                    place = (_S3Place if storage.is_s3(folder) else _LocalPlace)(folder, stem, name)
                    place.acquire(job, lease_s)
                    _HELD[key] = [place, 1]
            taken.append(key)
    except BaseException:
        Hold(taken).release()
        raise
    return Hold(taken)


def release_all() -> None:
    """Give back every hold of this process (a job's end; also run at exit)."""
    with _GUARD:
        entries = list(_HELD.values())
        _HELD.clear()
    for place, _ in entries:
        place.release()


def _register_release_at_exit() -> None:
    global _AT_EXIT
    if not _AT_EXIT:  # at the first take, not at import: the library is import-clean
        atexit.register(release_all)
        os.register_at_fork(after_in_child=_forget_in_child)
        _AT_EXIT = True


def _forget_in_child() -> None:
    """A forked child holds nothing: only the process that took a hold gives it back."""
    global _GUARD
    _GUARD = threading.Lock()  # the parent may have held it while forking
    for place, _ in _HELD.values():
        place.forget_in_child()
    _HELD.clear()


_AT_EXIT = False


def _running_job() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0] or "python")

