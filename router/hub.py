"""Downloads from the Hugging Face Hub into the standard HF cache, for `vllama pull` and /api/pull.

Why the standard cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``): vLLM resolves a repo id
through the same cache, so a pulled model is served without copying a byte, and a cache that
vLLM or ``hf download`` filled is reused by pulls.

Why not plain ``snapshot_download``: in huggingface_hub 2.4.0 its ``tqdm_class`` only drives
aggregate bars (per-file bars are an internal ``_AggregatedTqdm``), while Ollama's pull
stream reports progress per layer; and 2.4.0 downloads each file into a process-unique
temporary file that is deleted on failure, so an interrupted pull would start every
unfinished file from byte 0. So this module lists the files itself (one ``model_info`` call
with file metadata, which also gives the sizes shown before downloading and checked against
free disk space) and fetches each file with the library's own primitives
(``get_hf_file_metadata`` + ``http_get`` with ``resume_size``) into
``blobs/<etag>.incomplete``, which survives a failure and is resumed with an HTTP Range
request by the next pull. The finished blob is checked against its sha256 (git sha1 for
small non-LFS files) and linked into ``snapshots/<commit>/`` exactly as the library lays it
out. Files the Hub serves through Xet (when ``hf_xet`` is installed) go through
``hf_hub_download`` instead, whose Xet client has its own chunk-level integrity checks.

A pull "registers" a revision only at the very end: ``refs/<revision>`` and a small
manifest (``<repo folder>/.vllama/<commit>.json``, which scan_cache_dir ignores) are written
after every file is in place, so a failed pull leaves nothing that looks like a usable model,
and pulling again resumes it.

Pulls and deletes of one repository exclude each other through lock files next to the library's
own (``.locks/<repo folder>/``), so that they do across processes: ``vllama pull`` runs in a
process of its own beside the server's /api/pull, /api/delete and auto-pulls. A second pull
waits for the first; a delete is refused at once while a pull runs (see `_pulling`, `_deleting`).

Environment variables are read when each function is called, not when huggingface_hub was
imported (it freezes HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE at import): every call
passes the endpoint and cache dir explicitly, so a test (or a long-lived ``vllama serve``
whose environment is adjusted) gets what ``os.environ`` says now. The token is resolved by
the library per call (HF_TOKEN, then the token file).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Self, cast
from urllib.parse import urlsplit

import filelock
import huggingface_hub
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import http_get, repo_folder_name
from huggingface_hub.utils import build_hf_headers
from huggingface_hub.utils._runtime import is_xet_available  # not re-exported in 2.4.0

try:  # huggingface_hub 2.x ships its HTTP stack as httpx2; 1.x used httpx.
    import httpx2 as _httpx
except ImportError:  # pragma: no cover
    import httpx as _httpx  # type: ignore[no-redef]

from .config import is_local_source
from .units import human_bytes

__all__ = [
    "DEFAULT_WORKERS",
    "FileEntry",
    "LocalModel",
    "Progress",
    "PullError",
    "PullPlan",
    "PullTarget",
    "delete",
    "hub_env",
    "local_snapshot",
    "ollama_status",
    "parse_ref",
    "plan",
    "pull",
    "pull_events",
    "render_pull",
    "resolve_target",
]

log = logging.getLogger("vllama.hub")

DEFAULT_REVISION = "main"
DEFAULT_WORKERS = 4
PROGRESS_INTERVAL = 0.08
"""Seconds between two progress events for one file (Ollama sends about every 60 ms)."""

# What vLLM reads from a model directory besides the weights: config, generation config,
# tokenizer (json/model/tiktoken/vocab/merges), chat template, sentence-transformers pooling
# config (1_Pooling/config.json), and remote code for trust_remote_code models. All small.
_SMALL_FILE_PATTERNS = ("*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.py")
_INDEX = "model.safetensors.index.json"
_MANIFEST_DIR = ".vllama"
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_HASH_CHUNK = 8 * 1024 * 1024
_LOCK_POLL = 0.25
"""Seconds between two checks of a cancel while waiting for a lock."""
_DELETE_WAIT = 60.0
"""Seconds a delete waits for another delete of the same repo (deletes take seconds)."""


# --- errors ------------------------------------------------------------------


class PullError(Exception):
    """A pull, plan or delete that cannot go on; `status` is the HTTP status to answer with.

    400 bad name or nothing vLLM can load, 401/403 gated repository, 404 repository, revision or
    file not found (or not cached, for delete), 409 delete while the repo is being pulled (or
    deleted), 499 cancelled, 502 the Hub or a mirror answered
    badly (or a download was corrupt or cut), 503 Hub unreachable or offline mode without the
    model cached, 507 not enough disk space. `message` is meant for people, as is.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Cancelled(PullError):
    def __init__(self) -> None:
        super().__init__(499, "pull cancelled; pull again to resume")


# --- environment -------------------------------------------------------------


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubEnv:
    """The Hub settings of this process, as its environment says *now*."""

    endpoint: str
    cache_dir: Path
    offline: bool


def hub_env() -> HubEnv:
    """Read HF_ENDPOINT, HF_HUB_CACHE / HF_HOME and HF_HUB_OFFLINE at call time (same rules as the library)."""
    env = os.environ
    endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    cache_dir = Path(os.path.expandvars(os.path.expanduser(cache))).resolve()
    offline = _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))
    return HubEnv(endpoint=endpoint, cache_dir=cache_dir, offline=offline)


def _has_token() -> bool:
    return huggingface_hub.get_token() is not None


# --- names -------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``; ``"org/name"`` → ``("org/name", None)``.

    Also accepts what Ollama users type for Hub models (``hf.co/org/name``, a ``:latest``
    tag). Any other ``:tag`` is refused rather than guessed: on the Hub a revision is ``@rev``.
    """
    s = ref.strip()
    for prefix in ("https://", "http://"):
        s = s.removeprefix(prefix)
    for prefix in ("hf.co/", "huggingface.co/"):
        s = s.removeprefix(prefix)
    repo, at, revision = s.partition("@")
    revision_opt = revision if at else None
    repo = repo.removesuffix(":latest")
    if ":" in repo:
        raise PullError(400, f"invalid model name {ref!r}: write a Hugging Face revision as REPO@REVISION, not with ':'")
    if not _REPO_RE.fullmatch(repo) or len(repo) > 96 or ".." in repo or "--" in repo:
        raise PullError(400, f"invalid model name {ref!r}: expected a Hugging Face repo id like org/name[@revision]")
    if revision_opt is not None and (not revision_opt or any(c.isspace() for c in revision_opt)):
        raise PullError(400, f"invalid revision in {ref!r}")
    return repo, revision_opt


@dataclass(frozen=True)
class PullTarget:
    """What a pull of `name` fetches: the repo and revision, and the registry model it is for (if any)."""

    repo: str
    revision: str | None
    model: str | None = None
    """The registry name when `name` was a models.yaml entry; None for a bare repo id."""
    local_dir: str | None = None
    """Set instead of a download when the registry entry serves a local directory."""


def resolve_target(name: str, config: Any | None = None) -> PullTarget:
    """Map a pull request's `name` to a download.

    A models.yaml name or alias downloads that entry's ``source`` at its ``revision`` (so
    ``ollama pull qwen`` fetches what ``qwen`` serves); anything else must be a repo id,
    optionally ``@revision``. `config` is a ``router.config.Config``.
    """
    if config is not None:
        model = config.lookup(name)
        if model is not None:
            if is_local_source(model.source):
                return PullTarget(model.source, None, model.name, local_dir=config.source_path(model))
            repo, rev = parse_ref(model.source)
            return PullTarget(repo, model.revision or rev, model.name)
    bare = name.strip().removesuffix(":latest")
    if "/" not in bare.split("@", 1)[0]:
        raise PullError(
            404,
            f"model {name!r} is not in the registry (models.yaml) and is not a Hugging Face repo id "
            "(expected org/name[@revision])",
        )
    repo, rev = parse_ref(name)
    return PullTarget(repo, rev)


def not_found(name: str) -> PullError:
    """Ollama's 404 for a model it does not have, word for word: clients match on "not found"."""
    return PullError(404, f"model '{name}' not found")


def delete_target(name: str, config: Any | None = None) -> PullTarget:
    """Map a delete request's `name` to the cached repo and revision it removes.

    As `resolve_target` for a models.yaml name or alias (its ``source`` at its ``revision``;
    `local_dir` set for a local directory, which the caller refuses), and a ``url:`` model is
    refused here: it has no files on this machine. Anything else is a repo id; a plain name
    (no ``org/``) counts as one only when it is some entry's ``source``, so that an Ollama name
    or a typo gets Ollama's ``model 'x' not found`` rather than a look into the cache.
    """
    model = config.lookup(name) if config is not None else None
    if model is not None and model.url:
        raise PullError(400, f'model "{model.name}" is served by {model.url}; it has no files here')
    if model is not None:
        return resolve_target(name, config)
    bare = name.strip().removesuffix(":latest")
    if "/" not in bare.split("@", 1)[0] and not _is_a_source(bare.split("@", 1)[0], config):
        raise not_found(name)
    repo, rev = parse_ref(name)
    return PullTarget(repo, rev)


def _is_a_source(repo: str, config: Any | None) -> bool:
    """Whether some models.yaml entry serves the Hub repo `repo` (e.g. ``source: gpt2``)."""
    return config is not None and any((ref := source_ref(m)) is not None and ref[0] == repo for m in config.models)


def source_ref(model: Any) -> tuple[str, str | None] | None:
    """The Hub repo and revision a models.yaml entry serves from this cache; None for a local
    directory, a ``url:`` model (its files are elsewhere) or a source that is no repo id."""
    if model.url or is_local_source(model.source):
        return None
    try:
        repo, rev = parse_ref(model.source)
    except PullError:
        return None
    return repo, model.revision or rev


def same_snapshot(repo: str, a: str | None, b: str | None) -> bool:
    """Whether revisions `a` and `b` (None: main) of `repo` are one snapshot in the cache, so that
    deleting one deletes the files of the other: the same name, or refs to the same commit
    (``main`` and ``v1`` often are)."""
    a, b = a or DEFAULT_REVISION, b or DEFAULT_REVISION
    if a == b:
        return True
    storage = _storage(hub_env().cache_dir, repo)
    commit = _commit_of(storage, a)
    return commit is not None and commit == _commit_of(storage, b)


# --- plan --------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a pull. `digest` is ``sha256:<hex>`` for LFS files, else ``sha256:<git oid>``."""

    path: str
    size: int
    digest: str
    sha256: str | None = None
    """The LFS sha256, when the Hub gave one: checked after download."""
    blob_id: str | None = None
    """The git blob id: checked (as git sha1) for non-LFS files."""
    cached: bool = False
    """Already in the snapshot (or its blob already in the cache)."""
    partial: int = 0
    """Bytes of an interrupted earlier download that the next one resumes from."""


@dataclass(frozen=True)
class PullPlan:
    """Everything a pull will fetch, known before a byte of weights moves."""

    repo: str
    revision: str
    """As asked (branch, tag or commit); `commit` is what it resolved to."""
    commit: str
    files: tuple[FileEntry, ...]
    cache_dir: Path
    gguf: str | None = None
    offline: bool = False

    @property
    def total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def cached(self) -> int:
        """Bytes already in the cache (complete files)."""
        return sum(f.size for f in self.files if f.cached)

    @property
    def partial(self) -> int:
        """Bytes of unfinished files that the pull resumes from."""
        return sum(f.partial for f in self.files if not f.cached)

    @property
    def to_download(self) -> int:
        return max(0, self.total - self.cached - self.partial)

    @property
    def snapshot_path(self) -> Path:
        return _storage(self.cache_dir, self.repo) / "snapshots" / self.commit


def _storage(cache_dir: Path, repo: str) -> Path:
    return cache_dir / repo_folder_name(repo_id=repo, repo_type="model")


def _is_root(path: str) -> bool:
    return "/" not in path


def _select(paths: Iterable[str], gguf: str | None) -> list[str]:
    """The repo files vLLM needs: small config/tokenizer files anywhere, weights at the root.

    Weights are ``*.safetensors`` at the root (vLLM globs the model directory, not its
    subfolders), else ``*.bin`` for repos that have no safetensors; with `gguf`, that one
    file instead. Subfolder copies (``original/``, ``onnx/``...) are only ever small files.
    """
    paths = list(paths)
    small = [p for p in paths if any(fnmatch.fnmatch(p, pat) for pat in _SMALL_FILE_PATTERNS)]
    if gguf is not None:
        return sorted({*small, gguf})
    weights = [p for p in paths if _is_root(p) and p.endswith(".safetensors")]
    if not weights:
        weights = [p for p in paths if _is_root(p) and p.endswith(".bin")]
    return sorted({*small, *weights})


def _filter_by_index(selected: list[str], index: dict[str, Any]) -> list[str]:
    """Drop root safetensors that the index does not list (e.g. Mistral's consolidated.safetensors,
    a second full copy of the weights in another layout)."""
    listed = set((index.get("weight_map") or {}).values())
    if not listed:
        return selected
    return [p for p in selected if not (p.endswith(".safetensors") and _is_root(p)) or p in listed]


def _hub_error(e: BaseException, repo: str, revision: str | None, env: HubEnv) -> PullError:
    """Turn a huggingface_hub / network / OS error into a PullError with a message that says what to do."""
    if isinstance(e, PullError):
        return e
    rev = revision or DEFAULT_REVISION
    page = f"{env.endpoint}/{repo}"
    if isinstance(e, hf_errors.GatedRepoError):  # a RepositoryNotFoundError subclass: test it first
        if not _has_token():
            return PullError(
                401,
                f"repository {repo!r} is gated: open {page}, log in and accept its licence, then set HF_TOKEN "
                "to an access token of that account (https://huggingface.co/settings/tokens) and pull again",
            )
        return PullError(
            403,
            f"repository {repo!r} is gated and the account of HF_TOKEN has no access yet: accept its licence "
            f"at {page} with that account (some repos need the authors' approval), then pull again",
        )
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        hint = "" if _has_token() else " (if it is private, set HF_TOKEN to a token that can read it)"
        return PullError(404, f"repository {repo!r} not found on {env.endpoint}{hint}")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return PullError(404, f"revision {rev!r} not found in repository {repo!r}")
    if isinstance(e, hf_errors.RemoteEntryNotFoundError):
        return PullError(404, f"file not found in {repo}@{rev}: {e.response.url if e.response is not None else e}")
    if isinstance(e, hf_errors.OfflineModeIsEnabled):
        return PullError(
            503,
            f"offline mode is on (HF_HUB_OFFLINE) and {repo}@{rev} is not complete in the cache at {env.cache_dir}: "
            "unset HF_HUB_OFFLINE to download it",
        )
    if isinstance(e, (_httpx.TransportError, hf_errors.LocalEntryNotFoundError)):
        return PullError(
            503,
            f"cannot reach the Hugging Face Hub at {env.endpoint} ({type(e).__name__}: {e}): check the network, "
            "set HF_ENDPOINT to a reachable mirror, or set HF_HUB_OFFLINE=1 to use models already in the cache "
            "(an interrupted pull resumes where it stopped)",
        )
    if isinstance(e, hf_errors.HfHubHTTPError):
        code = e.response.status_code if e.response is not None else 0
        if code == 401:
            return PullError(401, f"the Hub refused the token for {repo!r} (401): check HF_TOKEN")
        return PullError(502, f"the Hub at {env.endpoint} answered {code or 'an error'} for {repo}@{rev}: {e}")
    if isinstance(e, hf_errors.HFValidationError):
        return PullError(400, f"invalid repo id or revision {repo}@{rev}: {e}")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return PullError(507, f"disk full while pulling {repo!r} into {env.cache_dir}: free some space and pull again")
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return PullError(502, f"download of {repo}@{rev} was cut short ({e}); pull again to resume")
    if isinstance(e, OSError):
        return PullError(500, f"cannot write to the Hugging Face cache at {env.cache_dir}: {e}")
    return PullError(500, f"pull of {repo}@{rev} failed: {type(e).__name__}: {e}")


def _free_bytes(path: Path) -> tuple[Path, int]:
    """Free space where `path` will be: the nearest existing ancestor (the cache may not exist yet)."""
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    return p, shutil.disk_usage(p).free


def _pointer(storage: Path, commit: str, path: str) -> Path:
    return storage / "snapshots" / commit / Path(*path.split("/"))


def _state_of(storage: Path, commit: str, path: str, etag: str | None) -> tuple[bool, int]:
    """(cached, partial bytes) for one file, from the cache alone."""
    if _pointer(storage, commit, path).exists():
        return True, 0
    if etag:
        blob = storage / "blobs" / etag
        if blob.exists():
            return True, 0
        part = storage / "blobs" / f"{etag}.incomplete"
        if part.exists():
            return False, part.stat().st_size
    return False, 0


def _digest_of(sha256: str | None, blob_id: str | None) -> str:
    return f"sha256:{sha256 or blob_id or ''}"


def plan(repo: str, revision: str | None = None, gguf: str | None = None) -> PullPlan:
    """List the files vLLM needs from `repo` at `revision`, with sizes and what is already cached.

    Raises PullError for every reason the pull could not start: repo, revision or `gguf` file
    not found, gated without access (checked here with one HEAD, because the Hub shows a gated
    repo's file list to anyone), Hub unreachable, offline mode without the model cached, or
    not enough free disk space for the bytes still to download.
    """
    env = hub_env()
    rev = revision or DEFAULT_REVISION
    if env.offline:
        return _plan_offline(repo, revision, gguf, env)
    api = HfApi(endpoint=env.endpoint)
    storage = _storage(env.cache_dir, repo)
    try:
        info = api.model_info(repo, revision=rev, files_metadata=True, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        if not info.sha:
            raise PullError(502, f"the Hub at {env.endpoint} did not say which commit {repo}@{rev} is")
        commit = info.sha
        siblings = {s.rfilename: s for s in info.siblings or []}
        if gguf is not None and gguf not in siblings:
            ggufs = sorted(p for p in siblings if p.endswith(".gguf"))
            raise PullError(
                404, f"file {gguf!r} not found in {repo}@{rev}" + (f"; GGUF files there: {', '.join(ggufs)}" if ggufs else "")
            )
        selected = _select(siblings, gguf)
        if not any(p.endswith((".safetensors", ".bin", ".gguf")) for p in selected):
            ggufs = sorted(p for p in siblings if p.endswith(".gguf"))
            if ggufs:
                raise PullError(
                    400, f"{repo} has GGUF weights only; choose one with --gguf FILE ({', '.join(ggufs[:6])})"
                )
            raise PullError(400, f"{repo}@{rev} has no weights vLLM can load (*.safetensors or *.bin at the top level)")
        if info.gated:
            probe = "config.json" if "config.json" in selected else selected[0]
            get_hf_file_metadata(
                hf_hub_url(repo, probe, revision=commit, endpoint=env.endpoint),
                endpoint=env.endpoint,
                timeout=constants.HF_HUB_ETAG_TIMEOUT,
            )
        if gguf is None and _INDEX in selected:
            index_path = hf_hub_download(repo, _INDEX, revision=commit, cache_dir=env.cache_dir, endpoint=env.endpoint)
            selected = _filter_by_index(selected, json.loads(Path(index_path).read_text()))
        files: list[FileEntry] = []
        for p in selected:
            s = siblings[p]
            sha256 = s.lfs.sha256 if s.lfs is not None else None
            size = s.lfs.size if s.lfs is not None else s.size
            blob_id = s.blob_id
            if size is None:  # a mirror that ignores `?blobs=true`: ask the file itself
                meta = get_hf_file_metadata(
                    hf_hub_url(repo, p, revision=commit, endpoint=env.endpoint), endpoint=env.endpoint
                )
                size = meta.size or 0
                if meta.etag and _SHA256_RE.fullmatch(meta.etag):
                    sha256 = meta.etag
                elif meta.etag and _COMMIT_RE.fullmatch(meta.etag):
                    blob_id = meta.etag
            cached, partial = _state_of(storage, commit, p, sha256 or blob_id)
            files.append(FileEntry(p, size, _digest_of(sha256, blob_id), sha256, blob_id, cached=cached, partial=partial))
    except Exception as e:
        raise _hub_error(e, repo, revision, env) from e
    p_ = PullPlan(repo, rev, commit, tuple(files), env.cache_dir, gguf)
    _check_space(p_)
    return p_


def _check_space(p: PullPlan) -> None:
    _, free = _free_bytes(p.cache_dir)
    if p.to_download > free:
        raise PullError(
            507,
            f"not enough disk space to pull {p.repo}: need {human_bytes(p.to_download)} in {p.cache_dir}, "
            f"{human_bytes(free)} free",
        )


def _plan_offline(repo: str, revision: str | None, gguf: str | None, env: HubEnv) -> PullPlan:
    """Offline, a pull succeeds only if the cache already has the model complete (nothing to fetch)."""
    local = local_snapshot(repo, revision)
    rev = revision or DEFAULT_REVISION
    if local is None or not local.complete or local.commit is None:
        raise PullError(
            503,
            f"offline mode is on (HF_HUB_OFFLINE) and {repo}@{rev} is not complete in the cache at {env.cache_dir}: "
            "unset HF_HUB_OFFLINE to download it, or copy a cache that has it",
        )
    manifest = _read_manifest(_storage(env.cache_dir, repo), local.commit)
    snap = local.path
    if manifest is not None:
        files = [
            FileEntry(f["path"], f["size"], f["digest"], f.get("sha256"), f.get("blob_id"), cached=True)
            for f in manifest["files"]
        ]
    else:
        files = [
            FileEntry(str(q.relative_to(snap).as_posix()), q.stat().st_size, "", cached=True)
            for q in sorted(snap.rglob("*"))
            if q.is_file()
        ]
    return PullPlan(repo, rev, local.commit, tuple(files), env.cache_dir, gguf, offline=True)


# --- progress ----------------------------------------------------------------


ProgressKind = Literal["manifest", "wait", "file", "verify", "write", "success"]


@dataclass(frozen=True)
class Progress:
    """One step of a pull; `ollama_status` turns it into Ollama's /api/pull line."""

    kind: ProgressKind
    file: str | None = None
    digest: str | None = None
    total: int = 0
    completed: int = 0


def ollama_status(event: Progress) -> dict[str, Any]:
    """Ollama's /api/pull message for `event`; zero totals and completions are left out, as Ollama does."""
    if event.kind == "file":
        out: dict[str, Any] = {"status": f"pulling {event.file}"}
        if event.digest:
            out["digest"] = event.digest
        if event.total:
            out["total"] = event.total
        if event.completed:
            out["completed"] = event.completed
        return out
    return {
        "manifest": {"status": "pulling manifest"},
        # Ollama has no such status (a second pull there follows the first one's download);
        # its clients show any status as it comes.
        "wait": {"status": "waiting for another pull of this model to finish"},
        "verify": {"status": "verifying sha256 digest"},
        "write": {"status": "writing manifest"},
        "success": {"status": "success"},
    }[event.kind]


class _Emitter:
    """Serialises progress callbacks from the download threads, and carries the stop signals:
    the caller's `cancel`, and `failed`, set when one file fails so that the others stop too."""

    def __init__(self, on_progress: Callable[[Progress], None] | None, cancel: threading.Event) -> None:
        self._cb = on_progress
        self._lock = threading.Lock()
        self.cancel = cancel
        self.failed = threading.Event()

    def stopped(self) -> bool:
        return self.cancel.is_set() or self.failed.is_set()

    def emit(self, event: Progress) -> None:
        if self._cb is not None:
            with self._lock:
                self._cb(event)


class _FileBar:
    """A tqdm stand-in handed to huggingface_hub as ``tqdm_class``: reports one file's bytes.

    The library constructs it with tqdm's keyword arguments (total, initial, desc...) and calls
    ``update(n)`` per chunk (``update(-n)`` if a server ignored a Range request). Subclassed per
    file by `_bar_class`, because the library passes only a class. Having ``update_transfer``
    makes Xet downloads count each byte once (it marks the bar as "aggregated"). Raising from
    ``update`` is how a cancelled pull stops a Xet download mid-file (plain HTTP downloads are
    stopped by `_StopWriter`, which loses no byte).
    """

    entry: FileEntry
    emitter: _Emitter
    stop_here = True
    """False when `_StopWriter` stops the download instead (after the chunk is saved, not before)."""

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
        self.total = self.entry.size or total or 0
        self.n = initial or 0
        self._last = 0.0
        self._report(force=True)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or self.n >= self.total or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            e = self.entry
            self.emitter.emit(Progress("file", e.path, e.digest, self.total, min(max(self.n, 0), self.total)))

    def update(self, n: float | None = 1) -> None:
        if self.stop_here and self.emitter.stopped():
            raise _Cancelled()
        self.n += int(n or 0)
        self._report()

    def update_transfer(self, n: float | None = 1) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        # set_postfix_str, refresh, set_description...: display details a stream has no use for.
        return lambda *a, **k: None


def _bar_class(entry: FileEntry, emitter: _Emitter, stop_here: bool = True) -> type[_FileBar]:
    return type("_Bar", (_FileBar,), {"entry": entry, "emitter": emitter, "stop_here": stop_here})


class _StopWriter:
    """The partial file as http_get sees it: stops a cancelled download right *after* writing a
    chunk, so that every byte received is kept for the resume (the bar sees chunks before they
    are written)."""

    def __init__(self, f: Any, stopped: Callable[[], bool], size: int) -> None:
        self._f = f
        self._stopped = stopped
        self._size = size

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        if self._stopped() and self._f.tell() < self._size:  # a finished file may as well be kept
            raise _Cancelled()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


# --- pull --------------------------------------------------------------------


def _verify(path: Path, entry: FileEntry, etag: str) -> None:
    """Check a finished download against the Hub's digest: sha256 for LFS files, git's blob sha1 otherwise."""
    if entry.sha256 or _SHA256_RE.fullmatch(etag):
        want, h = (entry.sha256 or etag), hashlib.sha256()
    elif entry.blob_id or _COMMIT_RE.fullmatch(etag):
        want, h = (entry.blob_id or etag), hashlib.sha1()
        h.update(b"blob %d\0" % path.stat().st_size)
    else:
        return  # a mirror with opaque etags: the size check of http_get is all there is
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    if h.hexdigest() != want:
        path.unlink(missing_ok=True)
        raise PullError(502, f"{entry.path} does not match its digest {want} (corrupt download, deleted); pull again")


def _link(blob: Path, pointer: Path) -> None:
    """Relative symlink snapshots/<commit>/<file> → blobs/<etag>, as huggingface_hub lays out its cache."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.tmp")
    os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    os.replace(tmp, pointer)


_FLOCKLESS: set[Path] = set()
"""Lock folders found without flock (warned about once)."""


class _Lock:
    """A lock file shared with other processes, like huggingface_hub's ``WeakFileLock``: the
    library's per-blob lock (``.locks/<repo>/<etag>.lock``), so that a concurrent pull, vLLM or
    ``hf download`` never appends to the same partial file, and our per-repo pull and delete locks.

    As the library does: lock files are group-writable (users sharing a cache wait for each
    other), a filesystem without flock (some NFS mounts, where filelock 3.x raises
    NotImplementedError; 4.x falls back by itself) gets a SoftFileLock (an O_EXCL file, which a
    killed process leaves behind, hence only as a fallback), and a lock that fails to release is
    removed rather than left held. Waiting checks `stopped` every `_LOCK_POLL` seconds.
    """

    def __init__(self, path: Path, stopped: Callable[[], bool] = lambda: False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock: filelock.BaseFileLock = filelock.FileLock(str(path), mode=0o664)
        self._stopped = stopped

    def acquire(self, timeout: float | None = None) -> None:
        """Wait for the lock, at most `timeout` seconds (0: one try, then filelock.Timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stopped():
                raise _Cancelled()
            left = _LOCK_POLL if deadline is None else min(_LOCK_POLL, max(0.0, deadline - time.monotonic()))
            try:
                self._try(left)
                return
            except filelock.Timeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def _try(self, timeout: float) -> None:
        try:
            self._lock.acquire(timeout=timeout)
        except NotImplementedError as e:
            if "use SoftFileLock instead" not in str(e):
                raise
            if self._path.parent not in _FLOCKLESS:  # once per folder, not once per file of each pull
                _FLOCKLESS.add(self._path.parent)
                log.warning("the filesystem of %s has no flock; falling back to soft lock files", self._path.parent)
            self._lock = filelock.SoftFileLock(str(self._path))
            self._lock.acquire(timeout=timeout)

    def release(self) -> None:
        try:
            self._lock.release()
        except OSError:
            with contextlib.suppress(OSError):
                self._path.unlink()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _repo_lock(cache_dir: Path, repo: str, kind: Literal["pull", "delete"],
               stopped: Callable[[], bool] = lambda: False) -> _Lock:
    """Our lock of `repo` for `kind`, beside the library's blob locks (no etag is named so)."""
    return _Lock(cache_dir / ".locks" / _storage(cache_dir, repo).name / f"vllama-{kind}.lock", stopped)


@contextlib.contextmanager
def _pulling(p: PullPlan, env: HubEnv, emitter: _Emitter) -> Iterator[None]:
    """Hold `p.repo`'s pull lock while the pull writes (files, manifest, ref): one pull of a repo at a time.

    A second pull (another client, `vllama pull` beside the server, an auto-pull) says that it
    waits, then finds the first one's files in place. Pulls used to share the work file by file,
    but then a cancelled one could write its pending manifest after the other had finished, and
    a complete model showed as partial until pulled again; waiting costs nothing when both want
    the same files. Per repo rather than per revision, because revisions share blobs (and their
    partial files), which a delete of one revision must not remove while another one is pulled.
    """
    try:
        lock = _repo_lock(p.cache_dir, p.repo, "pull", emitter.stopped)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            emitter.emit(Progress("wait"))
            lock.acquire()
    except OSError as e:
        raise _hub_error(e, p.repo, p.revision, env) from e
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _deleting(env: HubEnv, repo: str) -> Iterator[None]:
    """Hold `repo`'s pull lock while deleting, or raise PullError 409 at once if a pull holds it.

    Refused rather than waited for: a pull takes minutes to hours, and a `vllama rm` or an
    /api/delete that hung that long would look broken (and would then delete what it waited
    for). 409 Conflict is what /api/delete already answers for a running model: the request is
    fine, the model's state is in the way, and trying again later can work; Ollama's clients
    show the error message whatever the status. Another delete of the repo is waited for
    (deletes take seconds), under a lock of its own, so that the pull lock being taken means
    that a pull holds it, as the message says.
    """
    with contextlib.ExitStack() as held:
        try:
            deletes = _repo_lock(env.cache_dir, repo, "delete")
            _take(deletes, _DELETE_WAIT, f"another delete of {repo} is still running; try again later")
            held.callback(deletes.release)
            pulls = _repo_lock(env.cache_dir, repo, "pull")
            _take(pulls, 0, f"{repo} is being pulled right now (by `vllama pull`, /api/pull or an auto_pull): "
                            "wait for the pull to finish, or stop it, then delete again")
            held.callback(pulls.release)
        except OSError as e:  # a read-only cache
            raise _hub_error(e, repo, None, env) from e
        yield


def _take(lock: _Lock, timeout: float, busy: str) -> None:
    """Acquire `lock` within `timeout` seconds, else raise PullError 409 saying `busy`."""
    try:
        lock.acquire(timeout)
    except filelock.Timeout:
        raise PullError(409, busy) from None


def _fetch(p: PullPlan, entry: FileEntry, env: HubEnv, emitter: _Emitter) -> None:
    """Download one file into the cache (resuming a partial blob), verify it and link it."""
    if emitter.stopped():
        raise _Cancelled()
    storage = _storage(p.cache_dir, p.repo)
    pointer = _pointer(storage, p.commit, entry.path)
    bar = _bar_class(entry, emitter, stop_here=False)
    url = hf_hub_url(p.repo, entry.path, revision=p.commit, endpoint=env.endpoint)
    meta = get_hf_file_metadata(url, endpoint=env.endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    etag = meta.etag or entry.sha256 or entry.blob_id
    if not etag:
        raise PullError(502, f"the Hub gave no ETag for {entry.path} of {p.repo}")
    blob = storage / "blobs" / etag
    if meta.xet_file_data is not None and is_xet_available():
        hf_hub_download(
            p.repo, entry.path, revision=p.commit, cache_dir=p.cache_dir, endpoint=env.endpoint,
            tqdm_class=cast(Any, _bar_class(entry, emitter)),
        )  # fmt: skip
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(p.cache_dir / ".locks" / storage.name / f"{etag}.lock", emitter.stopped):
        if not blob.exists():
            partial = blob.with_name(f"{etag}.incomplete")
            size = meta.size if meta.size is not None else entry.size
            headers = build_hf_headers()
            if urlsplit(meta.location).netloc != urlsplit(url).netloc:
                headers.pop("authorization", None)  # a CDN gets a signed URL, never the token
            try:
                with partial.open("ab") as f:
                    resume = f.tell()
                    if resume > size:
                        f.seek(0)
                        f.truncate()
                        resume = 0
                    http_get(
                        meta.location, cast(Any, _StopWriter(f, emitter.stopped, size)), resume_size=resume,
                        headers=headers, expected_size=size, tqdm_class=cast(Any, bar),
                    )  # fmt: skip
            except BaseException:
                if partial.exists() and partial.stat().st_size == 0:
                    partial.unlink()  # nothing to resume from: leave no litter
                raise
            _verify(partial, entry, etag)
            os.replace(partial, blob)
        else:
            bar(total=entry.size, initial=entry.size)
        if not pointer.exists():
            _link(blob, pointer)


def _manifest_path(storage: Path, commit: str) -> Path:
    return storage / _MANIFEST_DIR / f"{commit}.json"


def _read_manifest(storage: Path, commit: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_manifest_path(storage, commit).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all; no temporary file is left behind either way (one in
    ``refs/`` makes ``scan_cache_dir`` call the whole repo corrupt)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_manifest(p: PullPlan, complete: bool) -> None:
    data = {
        "repo": p.repo,
        "revision": p.revision,
        "commit": p.commit,
        "gguf": p.gguf,
        "complete": complete,
        "written_at": datetime.now(UTC).isoformat(),
        "files": [{k: v for k, v in asdict(f).items() if k not in ("cached", "partial")} for f in p.files],
    }
    _write_atomic(_manifest_path(_storage(p.cache_dir, p.repo), p.commit), json.dumps(data, indent=1))


def pull(
    repo: str,
    revision: str | None = None,
    gguf: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    *,
    pull_plan: PullPlan | None = None,
    cancel: threading.Event | None = None,
    workers: int = DEFAULT_WORKERS,
) -> Path:
    """Download what vLLM needs from `repo` into the HF cache; return the snapshot directory.

    Blocking. `on_progress` receives Progress events (never two at once, from worker threads);
    `pull_plan` skips planning again when the caller already showed the plan; setting `cancel`
    stops the pull soon (PullError 499), keeping partial files for the next pull to resume.
    Every failure is a PullError; the revision is registered (ref + manifest) only on success.
    While another pull of `repo` runs (in any process) this one waits for it (a "wait" event).
    """
    env = hub_env()
    emitter = _Emitter(on_progress, cancel or threading.Event())
    emitter.emit(Progress("manifest"))
    p = pull_plan or plan(repo, revision, gguf)
    if p.offline:  # writes nothing, so takes no lock either: an offline cache may be read-only
        for f in p.files:
            emitter.emit(Progress("file", f.path, f.digest, f.size, f.size))
        _register(p, env, emitter)
    else:
        with _pulling(p, env, emitter):
            p = _download(_refresh(p), env, emitter, workers)
            _register(p, env, emitter)
    emitter.emit(Progress("success"))
    return p.snapshot_path


def _refresh(p: PullPlan) -> PullPlan:
    """`p` with what is cached read from disk again: a plan is made before the pull lock is taken
    (`vllama pull` shows it first), so another pull may have fetched files since, or a delete
    removed them (a pull that trusted the plan then registered a model without its files)."""
    storage = _storage(p.cache_dir, p.repo)
    files = []
    for f in p.files:
        cached, partial = _state_of(storage, p.commit, f.path, f.sha256 or f.blob_id)
        files.append(replace(f, cached=cached, partial=partial))
    return replace(p, files=tuple(files))


def _register(p: PullPlan, env: HubEnv, emitter: _Emitter) -> None:
    """Make the downloaded revision visible: its complete manifest, then its ref (none offline)."""
    emitter.emit(Progress("verify"))  # each file was checked as it finished; Ollama says it once
    emitter.emit(Progress("write"))
    if p.offline:
        return
    try:
        _write_manifest(p, complete=True)
        if p.revision != p.commit:
            _write_atomic(_storage(p.cache_dir, p.repo) / "refs" / p.revision, p.commit)
    except OSError as e:
        raise _hub_error(e, p.repo, p.revision, env) from e


def _download(p: PullPlan, env: HubEnv, emitter: _Emitter, workers: int) -> PullPlan:
    """Fetch the files not cached yet, in parallel; link those whose blob is cached but not linked."""
    storage = _storage(p.cache_dir, p.repo)
    todo = [f for f in p.files if not f.cached]
    errors: list[BaseException] = []

    def run(entry: FileEntry) -> None:
        try:
            _fetch(p, entry, env, emitter)
        except BaseException as e:  # noqa: BLE001 - collected, the first real one is raised below
            errors.append(e)
            emitter.failed.set()

    try:
        if todo:
            _write_manifest(p, complete=False)  # lets local_snapshot show the pull as partial
        for f in p.files:
            if f.cached:
                pointer = _pointer(storage, p.commit, f.path)
                etag = f.sha256 or f.blob_id
                if not pointer.exists() and etag and (storage / "blobs" / etag).exists():
                    _link(storage / "blobs" / etag, pointer)
                emitter.emit(Progress("file", f.path, f.digest, f.size, f.size))
        if todo:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo))), thread_name_prefix="vllama-pull") as ex:
                try:
                    list(ex.map(run, todo))
                except BaseException:
                    # Ctrl-C in `vllama pull` lands here, in the waiting thread: without this the
                    # pool's shutdown would wait for every file in flight to download to its end.
                    emitter.failed.set()
                    raise
    except Exception as e:
        raise _hub_error(e, p.repo, p.revision, env) from e
    if errors:
        real = [e for e in errors if not isinstance(e, _Cancelled)]
        err = (real or errors)[0]
        raise _hub_error(err, p.repo, p.revision, env) from err
    if emitter.cancel.is_set():
        raise _Cancelled()
    return replace(p, files=tuple(replace(f, cached=True, partial=0) for f in p.files))


# --- async wrapper for the HTTP layer -----------------------------------------


async def pull_events(
    repo: str, revision: str | None = None, gguf: str | None = None, *, raise_errors: bool = False
) -> AsyncIterator[dict[str, Any]]:
    """Run `pull` in a thread and yield Ollama's /api/pull messages as they happen.

    On failure the last message is ``{"error": message}`` (the Ollama stream shape), or, with
    `raise_errors`, the PullError itself is raised so a non-streaming handler can answer with
    its status. Closing the generator early (the client went away) cancels the download;
    partial files stay for the next pull to resume.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | BaseException | None] = asyncio.Queue()
    cancel = threading.Event()

    def put(item: dict[str, Any] | BaseException | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            cancel.set()

    def run() -> None:
        try:
            pull(repo, revision, gguf, lambda ev: put(ollama_status(ev)), cancel=cancel)
            put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the event loop
            put(e)

    # A thread of its own: a long download must not hold a slot of the loop's default executor.
    threading.Thread(target=run, name=f"vllama-pull {repo}", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                err = item if isinstance(item, PullError) else _hub_error(item, repo, revision, hub_env())
                if raise_errors:
                    raise err
                yield {"error": err.message}
                return
            yield item
    finally:
        cancel.set()


# --- local state -------------------------------------------------------------


@dataclass(frozen=True)
class LocalModel:
    """A model as it is on disk, without asking the network."""

    path: Path
    """The snapshot directory (or the local source directory) to hand to vLLM."""
    size: int
    """Bytes on disk: unique blobs of the snapshot, plus partial downloads of an unfinished pull."""
    modified_at: datetime
    commit: str | None
    """The commit hash; None for a local directory."""
    complete: bool
    files: int = 0
    gguf: Path | None = None
    """The GGUF file to hand to vLLM, when the revision was pulled with ``gguf=``."""

    @property
    def state(self) -> Literal["complete", "partial"]:
        return "complete" if self.complete else "partial"


def _dir_stats(root: Path) -> tuple[int, float, int]:
    """(size of unique real files, newest mtime, file count) under `root`, following symlinks once."""
    seen: set[Path] = set()
    size, newest, count = 0, 0.0, 0
    for q in root.rglob("*"):
        if q.is_dir():
            continue
        try:
            real = q.resolve(strict=True)
            st = real.stat()
        except OSError:
            continue
        count += 1
        newest = max(newest, st.st_mtime)
        if real not in seen:
            seen.add(real)
            size += st.st_size
    return size, newest or root.stat().st_mtime, count


def _looks_complete(snap: Path) -> bool:
    """For snapshots a pull of ours did not write (vLLM or ``hf download`` did): config and weights present."""
    if any(snap.glob("*.gguf")):
        return True
    if not (snap / "config.json").exists():
        return False
    index = snap / _INDEX
    if index.exists():
        try:
            listed = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError):
            return False
        return all((snap / name).exists() for name in listed)
    return any(snap.glob("*.safetensors")) or any(snap.glob("*.bin"))


def _commit_of(storage: Path, rev: str) -> str | None:
    """The commit `rev` names in the cache: itself if a hash, else its ref, else (no ref: a pull of
    it is unfinished) the commit of its newest pending manifest; None when the cache knows nothing."""
    if _COMMIT_RE.fullmatch(rev):
        return rev
    try:
        return (storage / "refs" / rev).read_text().strip()
    except OSError:
        pass
    pending = []
    for m in (storage / _MANIFEST_DIR).glob("*.json"):
        data = _read_manifest(storage, m.stem)
        if data and data.get("revision") == rev:
            pending.append((m.stat().st_mtime, m.stem))
    return max(pending)[1] if pending else None


def local_snapshot(source: str, revision: str | None = None) -> LocalModel | None:
    """What the cache (or a local directory `source`, already resolved with
    ``Config.source_path``) holds for a model; None when nothing.

    Never touches the network, so /api/tags, ``vllama list`` and ``serve`` (deciding whether
    to auto-pull) stay fast and work offline. A revision counts as `complete` when a pull of
    ours finished it (its manifest says so and every file is there) or, for caches filled by
    other tools, when config.json and all weights are present. An unfinished pull shows as
    `complete=False` with its partial bytes counted.
    """
    if source.startswith(("/", "./", "../", "~")) or source in (".", "..") or os.path.isdir(source):
        d = Path(os.path.expanduser(source))
        if not d.is_dir():
            return None
        size, mtime, count = _dir_stats(d)
        complete = (d / "config.json").exists() or any(d.glob("*.gguf"))
        return LocalModel(d.resolve(), size, datetime.fromtimestamp(mtime, UTC), None, complete, count)
    try:
        repo, ref_rev = parse_ref(source)
    except PullError:
        return None
    env = hub_env()
    storage = _storage(env.cache_dir, repo)
    if not storage.is_dir():
        return None
    commit = _commit_of(storage, revision or ref_rev or DEFAULT_REVISION)
    if commit is None:
        return None
    snap = storage / "snapshots" / commit
    manifest = _read_manifest(storage, commit)
    if not snap.is_dir() and manifest is None:
        return None
    size, mtime, count = _dir_stats(snap) if snap.is_dir() else (0, 0.0, 0)
    if manifest is not None:
        names = [f["path"] for f in manifest.get("files", [])]
        complete = bool(manifest.get("complete")) and all(_pointer(storage, commit, n).exists() for n in names)
        for f in manifest.get("files", []):
            etag = f.get("sha256") or f.get("blob_id")
            part = storage / "blobs" / f"{etag}.incomplete" if etag else None
            if part is not None and part.exists() and not _pointer(storage, commit, f["path"]).exists():
                st = part.stat()
                size += st.st_size
                mtime = max(mtime, st.st_mtime)
    else:
        complete = snap.is_dir() and _looks_complete(snap)
    if not mtime:
        mtime = (snap if snap.is_dir() else storage).stat().st_mtime
    gguf = (manifest or {}).get("gguf")
    return LocalModel(
        snap, size, datetime.fromtimestamp(mtime, UTC), commit, complete, count, snap / gguf if gguf else None
    )


def delete(repo: str, revision: str | None = None, *, all_revisions: bool = False) -> int:
    """Remove `repo` at `revision` (default: main) from the cache; return the bytes freed.

    Goes through ``scan_cache_dir().delete_revisions(...)`` so blobs shared with another
    cached revision survive. `all_revisions` removes every cached revision of the repo.
    Partial downloads and our manifest for the revision go too, and so does an unfinished
    pull on its own (no ref yet, maybe no ``snapshots/`` yet, which scan_cache_dir calls
    corrupt and skips): ``local_snapshot`` shows it as a partial model, so it must be
    deletable. PullError 404 when the revision is not cached, 409 at once while any revision of
    the repo is being pulled, by any process (see `_deleting`). Refusing while the model is
    running is the caller's job: this module does not know what runs.
    """
    env = hub_env()
    storage = _storage(env.cache_dir, repo)
    if not storage.is_dir():  # checked before taking locks, which would create .locks/<repo>/
        raise PullError(404, f"{repo} is not in the cache at {env.cache_dir}")
    with _deleting(env, repo):
        return _delete(env, repo, revision, all_revisions)


def _delete(env: HubEnv, repo: str, revision: str | None, all_revisions: bool) -> int:
    """`delete`, under the repo's locks."""
    rev = revision or DEFAULT_REVISION
    storage = _storage(env.cache_dir, repo)
    if not storage.is_dir():  # another delete removed it while this one waited
        raise PullError(404, f"{repo} is not in the cache at {env.cache_dir}")
    info = huggingface_hub.scan_cache_dir(env.cache_dir)
    cached = next((r for r in info.repos if r.repo_id == repo and r.repo_type == "model"), None)
    revisions = {r.commit_hash for r in cached.revisions} if cached else set()
    pulls = {m.stem for m in (storage / _MANIFEST_DIR).glob("*.json")}
    if all_revisions:
        commits = revisions | pulls
    else:
        commit = _commit_of(storage, rev)
        if commit is None or commit not in revisions | pulls:
            raise PullError(404, f"{repo}@{rev} is not in the cache at {env.cache_dir}")
        commits = {commit}
    if not commits:
        raise PullError(404, f"{repo} is not in the cache at {env.cache_dir}")
    freed = sum(_forget_pull(storage, c) for c in commits)
    if commits & revisions:
        strategy = info.delete_revisions(*sorted(commits & revisions))
        freed += strategy.expected_freed_size
        strategy.execute()
    if cached is None and storage.is_dir() and not any(storage.glob(f"{_MANIFEST_DIR}/*.json")) \
            and not any(storage.glob("snapshots/*")):
        # Nothing usable was ever linked: what is left (finished but unlinked blobs) is litter.
        freed += sum(q.stat().st_size for q in storage.rglob("*") if q.is_file() and not q.is_symlink())
        shutil.rmtree(storage, ignore_errors=True)
    return freed


def _forget_pull(storage: Path, commit: str) -> int:
    """Remove our manifest of `commit` and the partial blobs it lists; return their bytes."""
    freed = 0
    for f in (_read_manifest(storage, commit) or {}).get("files", []):
        etag = f.get("sha256") or f.get("blob_id")
        part = storage / "blobs" / f"{etag}.incomplete" if etag else None
        if part is not None and part.exists():
            freed += part.stat().st_size
            part.unlink(missing_ok=True)
    _manifest_path(storage, commit).unlink(missing_ok=True)
    return freed


# --- CLI rendering -----------------------------------------------------------


def render_pull(repo: str, revision: str | None, gguf: str | None, console: Any) -> Path:
    """`vllama pull`: show the plan (files, size, what is cached), then one rich bar per file
    with bytes, rate and ETA. Raises PullError like `pull`; the CLI prints its message."""
    p = plan(repo, revision, gguf)
    extra = []
    if p.cached:
        extra.append(f"{human_bytes(p.cached)} cached")
    if p.partial:
        extra.append(f"resuming {human_bytes(p.partial)}")
    console.print(
        f"[bold]{p.repo}[/] @ {p.revision} ({p.commit[:12]}): {len(p.files)} files, {human_bytes(p.total)}"
        + (f" ({', '.join(extra)})" if extra else "")
        + f"; {human_bytes(p.to_download)} to download into {p.cache_dir}"
    )
    tasks: dict[str, Any] = {}
    with _bars(console) as bars:

        def on_progress(ev: Progress) -> None:
            if ev.kind == "file" and ev.file is not None:
                if ev.file not in tasks:
                    tasks[ev.file] = bars.add_task(ev.file, total=ev.total or None)
                bars.update(tasks[ev.file], completed=ev.completed, total=ev.total or None)
            elif ev.kind == "wait":
                console.print(f"waiting for another pull of {p.repo} to finish (a `vllama pull` or the server's)")
            elif ev.kind == "verify":
                console.print("verifying sha256 digest")

        path = pull(repo, revision, gguf, on_progress, pull_plan=p)
    console.print(f"[green]success[/]: {path}")
    return path


def _bars(console: Any, get_time: Callable[[], float] | None = None) -> Any:
    """The rich progress display of `render_pull`: name, bar, bytes, rate, ETA, in binary units
    throughout (rich's TransferSpeedColumn has decimal rates only: "1.0/2.0 MiB 1.2 MB/s")."""
    from rich import filesize
    from rich.progress import BarColumn, DownloadColumn, ProgressColumn, Task, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class BinarySpeedColumn(ProgressColumn):
        """TransferSpeedColumn's rate with DownloadColumn(binary_units=True)'s units."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            if speed is None:
                return Text("?", style="progress.data.speed")
            unit, suffix = filesize.pick_unit_and_suffix(int(speed), _BINARY_UNITS, 1024)
            return Text(f"{speed / unit:,.{0 if unit == 1 else 1}f} {suffix}/s", style="progress.data.speed")

    return RichProgress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        BinarySpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        get_time=get_time,
    )


_BINARY_UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"]
"""The suffixes of rich's DownloadColumn(binary_units=True), for the rate beside it."""
