"""Where `loramesh adapter import` finds a PEFT LoRA adapter made elsewhere, before it is packed and signed by
its new owner like any adapter trained here (node.adapters.pack):

    hf://ORG/NAME[@REVISION]   the Hugging Face Hub, through huggingface_hub and its cache (HF_HOME,
                               HF_HUB_OFFLINE=1 reads the cache only; HF_ENDPOINT for a mirror)
    https://HOST/PATH          a folder served over HTTP(S): PATH/adapter_config.json and
                               PATH/adapter_model.safetensors (http:// too)
    file:///PATH or PATH       a local folder (its two files copied, following links)

Only the two files a PEFT adapter saved with safetensors needs are fetched: a pickle checkpoint
(adapter_model.bin) is never downloaded, let alone loaded. Every size is bounded before it is written, and
nothing fetched is trusted: packing checks the config and the tensors against the base as for any folder.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from common.http import DownloadError, download
from node.adapters.errors import PackageError
from node.adapters.limits import MAX_ADAPTER_CONFIG_BYTES
from node.adapters.weights import CONFIG_FILE, WEIGHTS_FILE

# a LoRA of rank 64 on every projection of a 70B base is ~1.7 GB; past this an "adapter" is something else
MAX_IMPORT_BYTES = 4 << 30
MAX_REDIRECTS = 5  # an http(s) folder's (a registry's are not followed)
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def fetch_peft(source: str, workdir: Path, *, max_bytes: int = MAX_IMPORT_BYTES, timeout: float = 60.0) -> Path:
    """The local folder holding `source`'s adapter_config.json and adapter_model.safetensors (fetched into
    `workdir` or the Hugging Face cache when remote); PackageError in one line when it cannot be had."""
    if source.startswith("hf://"):
        repo, _, revision = source.removeprefix("hf://").partition("@")
        return _from_hub(repo, revision or None, workdir, max_bytes=max_bytes)
    if source.startswith(("https://", "http://")):
        return _from_http(source.rstrip("/"), workdir, max_bytes=max_bytes, timeout=timeout)
    path = Path(unquote(urlparse(source).path)) if source.startswith("file://") else Path(source)
    if not path.is_dir():
        raise PackageError(f"{source} is not a folder (nor hf://ORG/NAME, nor an http(s):// URL)")
    # the two files, as from anywhere else: a folder from elsewhere may hold a tokenizer of megabytes (a package
    # holds 1 MiB beside its config and weights) or links to files of the importer's; links to the two files
    # themselves (a Hugging Face snapshot's, to its blobs) are followed, and their contents checked when packed
    out = _fresh(workdir / "peft")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise PackageError(
                f"{source} has no {name}: only PEFT LoRA adapters saved with safetensors can be imported"
            )
        shutil.copyfile(path / name, out / name)
    return out


def _from_hub(repo: str, revision: str | None, workdir: Path, *, max_bytes: int) -> Path:
    if not _HF_REPO.fullmatch(repo):
        raise PackageError(f"{repo!r} is not a Hugging Face repository id (ORG/NAME)")
    where = f"hf://{repo}" + (f"@{revision}" if revision else "")
    from huggingface_hub.utils import logging as hub_logging  # it sets its loggers' level when first imported

    limits = {CONFIG_FILE: MAX_ADAPTER_CONFIG_BYTES, WEIGHTS_FILE: max_bytes}
    paths = []

    # huggingface_hub logs each retry of a Hub it cannot reach (two lines each, a dozen before it gives up): the
    # user is told once, in the error below
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity(logging.ERROR)
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            paths.append(_hub_file(repo, name, revision, where, limits[name]))
    finally:
        hub_logging.set_verbosity(level)
    if paths[0].parent != paths[1].parent:  # one snapshot folder holds both; defensive against a mixed cache
        raise PackageError(f"{where}: the cached files come from two different revisions")
    # the cache's snapshot files are links to its blobs, and a package folder holds plain files only
    out = _fresh(workdir / "peft")
    for p in paths:
        shutil.copyfile(p.resolve(), out / p.name)
    return out


def _hub_file(repo: str, name: str, revision: str | None, where: str, limit: int) -> Path:
    """One file of a Hub repository, through the Hugging Face cache, at most `limit` bytes; PackageError in one
    line. The Hub says a file's size before it is downloaded (the import ignored its bound here, and a
    repository's 64 MiB file passed a 1 MiB one into the cache and the work folder: red team)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        info = hf_hub_download(repo, name, revision=revision, dry_run=True)  # the Hub's word, or the cache's
        if info.will_download and info.file_size is None:
            raise PackageError(f"{where}: the Hub says no size for {name}, so it cannot be held to {limit} bytes")
        if info.will_download and info.file_size > limit:
            raise PackageError(f"{where}: {name} is {info.file_size} bytes, more than the {limit} allowed")
        # by the revision as given, not the commit the size was read at: that would leave the branch's ref unwritten,
        # and a later offline import of it would not find the cache (a branch moved since is checked below)
        path = Path(hf_hub_download(repo, name, revision=revision))
        if path.stat().st_size > limit:  # a cache filled by another tool, or a mirror that said less
            raise PackageError(f"{where}: {name} is {path.stat().st_size} bytes, more than the {limit} allowed")
        return path
    except PackageError:
        raise
    except LocalEntryNotFoundError:  # first: it is an EntryNotFoundError too
        if constants.HF_HUB_OFFLINE:
            raise PackageError(f"{where}: {name} is not in the Hugging Face cache (HF_HUB_OFFLINE is set)") from None
        raise PackageError(
            f"{where}: {name} is not in the Hugging Face cache and the Hub cannot be reached at {constants.ENDPOINT} "
            "(HF_ENDPOINT names a mirror)"
        ) from None
    except EntryNotFoundError:
        raise PackageError(
            f"{where} has no {name}: only PEFT LoRA adapters saved with safetensors can be imported"
        ) from None
    except RepositoryNotFoundError:
        raise PackageError(f"{where}: no such repository (or it is private: set HF_TOKEN)") from None
    except Exception as e:  # the Hub's HTTP errors, a revision that does not exist, a full disk
        raise PackageError(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _from_http(url: str, workdir: Path, *, max_bytes: int, timeout: float) -> Path:
    out = _fresh(workdir / "peft")
    limits = {CONFIG_FILE: MAX_ADAPTER_CONFIG_BYTES, WEIGHTS_FILE: max_bytes}
    asyncio.run(_http_files(url, out, limits, timeout))
    return out


async def _http_files(url: str, out: Path, limits: dict[str, int], timeout: float) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=timeout) as client:
        for name, limit in limits.items():
            where = f"{url}/{name}"
            try:
                with open(out / name, "wb") as f:
                    await download(client, where, f.write, limit=limit, what=where, redirects=MAX_REDIRECTS)
            except DownloadError as e:  # a status, an encoded answer, past the limit, too slow: common.http
                raise PackageError(str(e)) from None
            except httpx.HTTPError as e:
                raise PackageError(f"{where}: {type(e).__name__}: {e}") from None
