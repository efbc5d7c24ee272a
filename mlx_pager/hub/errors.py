"""What can go wrong talking to the Hub, as errors whose messages say what to do."""

from __future__ import annotations

import errno

from ..units import format_bytes


class DownloadError(RuntimeError):
    """A download or plan that cannot go on; the message says what to do."""


class ModelNotFound(DownloadError):
    pass


class ModelGated(DownloadError):
    pass


class HubUnreachable(DownloadError):
    pass


class NotEnoughDisk(DownloadError):
    pass


class DownloadCancelled(Exception):
    """The user cancelled. What arrived stays in ``*.incomplete`` files and resumes."""


def hub_error(
    error: BaseException,
    repo_id: str,
    endpoint: str,
    revision: str = "main",
    *,
    partial_bytes: int | None = None,
) -> Exception:
    """Hub and network exceptions as a DownloadError that says what to do.

    ``partial_bytes`` is given while planning (nothing fetched yet in this call): what
    earlier downloads left in the cache, so a message only promises a resume when there
    is something to resume.
    """
    import httpx2
    from huggingface_hub import errors

    if isinstance(error, (DownloadError, DownloadCancelled)):
        return error
    if isinstance(error, errors.GatedRepoError) or (
        isinstance(error, errors.HfHubHTTPError)
        and error.response is not None
        and error.response.status_code in (401, 403)
        and not isinstance(error, errors.RepositoryNotFoundError)
    ):
        return ModelGated(
            f"{repo_id} is gated or private: accept its licence at {endpoint}/{repo_id}, "
            "then log in with `hf auth login` (or set HF_TOKEN) and download again."
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return ModelNotFound(
            f"{repo_id} has no revision {revision!r}: check the branch, tag or commit."
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return ModelNotFound(
            f"No model {repo_id} on the Hub: check the spelling (org/name, as on {endpoint})."
        )
    if isinstance(error, errors.OfflineModeIsEnabled):
        return HubUnreachable("HF_HUB_OFFLINE is set: unset it to download models.")
    if isinstance(error, (httpx2.TransportError, errors.LocalEntryNotFoundError)) or (
        isinstance(error, errors.HfHubHTTPError)
        and error.response is not None
        and error.response.status_code >= 500
    ):
        if partial_bytes == 0:
            return HubUnreachable(
                f"Cannot reach {endpoint} to look up {repo_id}: check your connection and "
                "try again; nothing was downloaded."
            )
        if partial_bytes:
            return HubUnreachable(
                f"Cannot reach {endpoint} to look up {repo_id}: check your connection and "
                f"try again; the {format_bytes(partial_bytes)} already downloaded is kept "
                "and resumes."
            )
        return HubUnreachable(
            f"Cannot reach {endpoint}: check your connection; the partial download is kept "
            "and resumes next time."
        )
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return NotEnoughDisk(
            "The disk is full: free some space (or set HF_HUB_CACHE to a larger disk); the "
            f"partial download is kept and `mlx-pager download {repo_id}` resumes it."
        )
    return DownloadError(f"Downloading {repo_id} failed: {type(error).__name__}: {error}")
