"""Fetching a planned download into the Hugging Face cache: byte progress, cancel, resume.

Why not only ``snapshot_download``: huggingface_hub writes each file to a process-unique
``*.incomplete`` file and deletes it on failure, so an interrupted download starts over.
Multi-GB shards over a home connection must resume, so each file is fetched here into
``blobs/<etag>.incomplete`` with ``Range`` requests, moved to its blob when complete, and
``snapshot_download`` then only links the snapshot (no bytes).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..units import format_bytes
from .cache import ALLOW_PATTERNS, disk_free, repo_storage
from .errors import DownloadCancelled, DownloadError, NotEnoughDisk, hub_error
from .plan import BUSY_STATUSES, TIMEOUT_S, DownloadPlan, RemoteFile, plan_download

CHUNK_BYTES = 256 * 1024  # progress and cancel granularity
RETRIES = 5  # dropped connections retried (with Range) within one call
RETRY_WAIT_S = 0.5  # doubled after each failure in a row, up to MAX_WAIT_S
MAX_WAIT_S = 30.0
SHA256 = re.compile(r"[0-9a-f]{64}")
PROGRESS_INTERVAL_S = 0.1  # the one throttle: the CLI's bar and the app redraw per call

# (done_bytes, total_bytes, current_file); done counts bytes already in the cache.
ProgressFn = Callable[[int, int, str], None]


def download(
    repo_id: str,
    revision: str | None = None,
    endpoint: str | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    *,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    free_space: Callable[[Path], int] = disk_free,
    plan: DownloadPlan | None = None,
) -> Path:
    """Download ``repo_id`` into the Hugging Face cache; returns the snapshot folder.

    ``progress(done_bytes, total_bytes, file)`` is called from this thread as bytes
    arrive (``done`` includes what was cached before). Setting ``cancel`` stops within
    one chunk (256 KB) and raises DownloadCancelled; so does an interrupt. Partial files
    stay as ``blobs/<etag>.incomplete`` and the next call resumes them with ``Range``.
    Raises DownloadError subclasses with messages that say what to do.
    """
    from huggingface_hub import snapshot_download

    cancel = cancel or threading.Event()
    if plan is None:
        plan = plan_download(
            repo_id, revision, endpoint, cache_dir=cache_dir, token=token,
            free_space=free_space, read_sizes=False,
        )  # fmt: skip
    if problem := plan.disk_problem:
        raise NotEnoughDisk(problem)
    state = _Progress(plan.total_bytes, plan.cached_bytes, progress, cancel)
    try:
        for f in plan.files:
            if not f.complete:
                _fetch_file(plan, f, state, token)
        # Every blob is here: this only links snapshots/<commit>/ and writes refs/.
        path = snapshot_download(
            repo_id,
            revision=plan.revision,
            cache_dir=plan.cache_dir,
            endpoint=plan.endpoint,
            token=token,
            allow_patterns=ALLOW_PATTERNS,
            tqdm_class=_tqdm_class(state),
        )
    except DownloadCancelled:
        raise
    except Exception as e:
        raise hub_error(e, repo_id, plan.endpoint, plan.revision) from None
    state.report(plan.files[-1].name if plan.files else "", force=True)
    return Path(path)


@dataclass
class _Progress:
    total: int
    done: int
    callback: ProgressFn | None
    cancel: threading.Event
    file: str = ""
    last: float = field(default=0.0)

    def add(self, n: int, file: str) -> None:
        self.done += n
        self.file = file
        self.report(file)
        self.check_cancel()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled(
                f"Download cancelled: {format_bytes(self.done)} of "
                f"{format_bytes(self.total)} kept; downloading again resumes there."
            )

    def report(self, file: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.callback is not None and (force or now - self.last >= PROGRESS_INTERVAL_S):
            self.last = now
            self.callback(self.done, self.total, file)


def _fetch_file(plan: DownloadPlan, f: RemoteFile, state: _Progress, token) -> None:
    """One file into blobs/<etag>.incomplete (resuming it), then moved to its blob."""
    from filelock import FileLock, Timeout
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    storage = repo_storage(plan.cache_dir, plan.repo_id)
    blob = storage / "blobs" / f.etag
    part = blob.with_name(f"{f.etag}.incomplete")
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock_path = plan.cache_dir / ".locks" / storage.name / f"{f.etag}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    url = hf_hub_url(plan.repo_id, f.name, revision=plan.commit, endpoint=plan.endpoint)
    headers = build_hf_headers(token=token)
    headers["Accept-Encoding"] = "identity"
    try:
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout:
        raise DownloadError(
            f"Another download of {plan.repo_id} is writing {f.name}: wait for it to finish."
        ) from None
    try:
        counted = min(f.cached_bytes, f.size)  # what state.done already includes
        failures = 0  # in a row, without a byte between them
        while failures <= RETRIES:
            have = part.stat().st_size if part.exists() else 0
            if have != counted:  # a partial the plan did not see, or one that was reset
                state.add(have - counted, f.name)
                counted = have
            if have > f.size:
                part.unlink()
                continue
            if have == f.size:
                break
            h = dict(headers)
            if have:
                h["Range"] = f"bytes={have}-"
            try:
                stream = get_session().stream(
                    "GET", url, headers=h, follow_redirects=True, timeout=TIMEOUT_S
                )
                with stream as r:
                    if r.status_code in BUSY_STATUSES:
                        r.read()
                        failures += 1
                        if failures > RETRIES:
                            raise DownloadError(
                                f"{plan.endpoint} answered {r.status_code} to {failures} "
                                f"requests in a row for {f.name} of {plan.repo_id}: it is "
                                "busy or failing. Try again later; what arrived is kept and "
                                "resumes."
                            )
                        time.sleep(_wait(failures, r.headers.get("Retry-After")))
                        continue
                    if r.status_code >= 400:
                        r.read()
                        hf_raise_for_status(r)
                    mode = "ab" if r.status_code == 206 else "wb"
                    if mode == "wb" and have:  # the server ignored Range: start over
                        state.add(-have, f.name)
                        counted = 0
                    with open(part, mode) as out:
                        for chunk in r.iter_bytes(CHUNK_BYTES):
                            out.write(chunk)
                            counted += len(chunk)
                            state.add(len(chunk), f.name)
            except _transient_errors() as e:
                state.check_cancel()  # cancelled while the connection stalled: not a failure
                failures = 1 if counted > have else failures + 1
                if failures > RETRIES:
                    raise e
                time.sleep(_wait(failures))
                continue
            failures += 1  # a clean but short response: ask again for the rest
        if not part.exists() or part.stat().st_size != f.size:
            got = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"{f.name} of {plan.repo_id} arrived with {got} bytes instead of {f.size}: "
                "download again to resume."
            )
        _verify(plan, f, part)
        os.replace(part, blob)
    finally:
        lock.release()


def _wait(failures: int, retry_after: str | None = None) -> float:
    """Exponential backoff; a server's Retry-After (seconds) is honoured up to the cap."""
    wait = RETRY_WAIT_S * 2 ** (failures - 1)
    if retry_after and retry_after.strip().isdigit():
        wait = max(wait, float(retry_after))
    return min(wait, MAX_WAIT_S)


def _verify(plan: DownloadPlan, f: RemoteFile, part: Path) -> None:
    """An LFS file's blob is named by its sha256: check the bytes before the name, so a
    blob never claims content it does not hold. A mismatch discards the file."""
    if not SHA256.fullmatch(f.etag):
        return  # a git blob id (small text files): sha1 of a header and the bytes
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        while chunk := fh.read(4 * 2**20):
            digest.update(chunk)
    if digest.hexdigest() != f.etag:
        part.unlink()
        raise DownloadError(
            f"{f.name} of {plan.repo_id} arrived corrupt: its sha256 is {digest.hexdigest()}, "
            f"the Hub's is {f.etag}. It was discarded; download again to fetch it afresh "
            "(if this repeats, the connection or a proxy is changing the bytes)."
        )


def _transient_errors() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError,)


def _tqdm_class(state: _Progress) -> type:
    """A tqdm for snapshot_download: forwards any bytes it fetches itself, and cancels."""
    import io

    from tqdm.auto import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["file"] = io.StringIO()
            kwargs.pop("name", None)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.unit == "B" and n:
                state.add(int(n), str(self.desc))
            return super().update(n)

    return Forward
