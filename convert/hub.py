"""Resolve a source argument to a local directory: a directory as is, anything else as a Hugging Face Hub repo id.

Hub downloads go through ``huggingface_hub.snapshot_download`` and so honour HF_HOME, HF_HUB_CACHE and
HF_HUB_OFFLINE. Only the config, the tokenizer files and one set of weight files are fetched (a repo holding both
safetensors and a ``.bin`` is not downloaded twice). Offline, the cache decides which weights are there.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import DryRunError, EntryNotFoundError, HfHubHTTPError, HFValidationError

from convert.errors import ConversionError, first_line
from convert.formats import CONFIG_FILE, TOKENIZER_FILES, WEIGHT_FILES, choose_weight_file

METADATA_FILES = [CONFIG_FILE, *TOKENIZER_FILES]


def _download(repo_id: str, revision: str | None, files: list[str]) -> Path:
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=files))
    except (HFValidationError, HfHubHTTPError, EntryNotFoundError, OSError) as e:
        at = f" at revision {revision}" if revision else ""
        raise ConversionError(
            f"'{repo_id}' is not a local directory, and the Hub could not provide it{at}: {first_line(e)}"
        ) from None


def _listing(repo_id: str, revision: str | None) -> list[str] | None:
    """The repo's candidate files, listed by the Hub without downloading; None when the Hub cannot be asked."""
    try:
        patterns = [*METADATA_FILES, *WEIGHT_FILES]
        infos = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, dry_run=True)
    except DryRunError:  # offline (HF_HUB_OFFLINE=1) or unreachable: fall back to the cache
        return None
    except (HFValidationError, HfHubHTTPError, EntryNotFoundError, OSError):
        return None  # _download repeats the call and reports the error
    return [info.filename for info in infos]


def resolve_source(source: str, revision: str | None = None) -> Path:
    """A local directory for ``source``: the directory itself, or a Hub snapshot of the repo id ``source``."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"source {source} is a file; expected a checkpoint directory or a Hub repo id")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConversionError(f"source directory {source} does not exist")
    names = _listing(source, revision)
    if names is None:  # offline: the weights are whichever the cache holds
        names = [p.name for p in _download(source, revision, METADATA_FILES).iterdir()]
    weights = choose_weight_file(names, f"Hub repo {source}")
    files = [*METADATA_FILES, weights]
    if weights.endswith(".index.json"):
        index = _download(source, revision, [*METADATA_FILES, weights]) / weights
        try:
            files += sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index}: not a valid index json with a 'weight_map' ({e})") from None
    return _download(source, revision, files)
