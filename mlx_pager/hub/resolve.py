"""Finding a model: a local folder as is, a Hub id in the local Hugging Face cache."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from .cache import ALLOW_PATTERNS


def resolve_model(
    id_or_path: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The folder to open: ``id_or_path`` itself, or the cached snapshot of a Hub id
    (in ``cache_dir``, default: the Hugging Face cache).

    Never downloads (that is `mlx-pager download`): a model that is not cached is an
    error that says so.
    """
    path = Path(id_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a model folder: it has no config.json.")
        return path
    if id_or_path.count("/") != 1 or id_or_path.startswith(("/", ".", "~")):
        raise FileNotFoundError(
            f"No folder {id_or_path!r}, and it is not a Hub id (org/name) either."
        )
    try:
        # mlx-lm's patterns: a snapshot lacking only README.md or *.bin files is complete.
        return Path(
            snapshot_download(
                id_or_path,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=ALLOW_PATTERNS,
            )
        )
    except IncompleteSnapshotError:
        raise FileNotFoundError(
            f"{id_or_path} is only partly downloaded. Finish it: `mlx-pager download "
            f"{id_or_path}` (it resumes where it stopped)."
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{id_or_path} is not in the Hugging Face cache. Download it first: "
            f"`mlx-pager download {id_or_path}` (or pick it in the app's Models screen)."
        ) from None
