"""router.hub against a local fake Hub (tests/fakehub.py): no network, tmp caches, random ports.

The Hub is unreachable from CI, and the real Hub would make these tests slow and flaky anyway;
the fake answers what huggingface_hub 2.4.0 asks, with the Hub's error headers, and records
every byte range it serves so that resume tests can prove nothing was fetched twice.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import threading
import time
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path

import filelock
import httpx
import pytest
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub import errors as hf_errors

from router import hub
from router.config import parse as parse_config
from router.hub import Progress, PullError, ollama_status

try:  # tests/ is not a package today; keep working if it becomes one
    from .fakehub import FakeHub
    from .served import ServedRouter
except ImportError:
    from fakehub import FakeHub
    from served import ServedRouter

REPO = "org/tiny"
MODEL = f"{REPO}/model.safetensors"
CHUNK = 64 * 1024


def _weights(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}',
    "generation_config.json": b'{"do_sample": false}',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
    "model.safetensors": _weights(2 * 1024 * 1024),
    "README.md": b"# tiny\n",
    "pytorch_model.bin": b"\0" * 1000,  # a second copy of the weights vLLM does not need
    ".gitattributes": b"*.safetensors filter=lfs\n",
}
WANTED = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running fake Hub serving REPO, with this process's Hub environment pointed at it."""
    with FakeHub() as h:
        h.add_repo(REPO, FILES, revisions=["v1"])
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        # Frozen at import by huggingface_hub: keep a developer's own login and offline flag out.
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "home" / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "home" / "stored_tokens"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        # The library reads the body in 10 MiB pieces and a dropped connection loses the piece in
        # flight; real drops happen far into a file, small test files need small pieces.
        monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
        yield h


def cache(tmp_path: Path) -> Path:
    return tmp_path / "hub"


def storage(tmp_path: Path, repo: str = REPO) -> Path:
    return cache(tmp_path) / ("models--" + repo.replace("/", "--"))


def collect() -> tuple[list[dict], callable]:
    events: list[dict] = []
    return events, lambda ev: events.append(ollama_status(ev))


# --- names -------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref, want",
    [
        ("org/name", ("org/name", None)),
        ("org/name@v1.0", ("org/name", "v1.0")),
        ("hf.co/org/name", ("org/name", None)),
        ("https://huggingface.co/org/name@main", ("org/name", "main")),
        ("org/name:latest", ("org/name", None)),
        ("gpt2", ("gpt2", None)),
    ],
)
def test_parse_ref(ref: str, want: tuple) -> None:
    assert hub.parse_ref(ref) == want


@pytest.mark.parametrize("ref", ["org/name:q4", "a/b/c", "", "org/na me", "org/name@", "-x/y"])
def test_parse_ref_rejects(ref: str) -> None:
    with pytest.raises(PullError) as e:
        hub.parse_ref(ref)
    assert e.value.status == 400


def test_resolve_target_uses_registry(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "models": [
                {"name": "tiny", "source": "org/tiny", "revision": "v1", "aliases": ["t"]},
                {"name": "mine", "source": "./models/mine"},
            ]
        },
        base_dir=tmp_path,
    )
    assert hub.resolve_target("tiny", cfg) == hub.PullTarget("org/tiny", "v1", "tiny:latest")
    assert hub.resolve_target("t:latest", cfg).repo == "org/tiny"
    local = hub.resolve_target("mine", cfg)
    assert local.local_dir == str((tmp_path / "models" / "mine").resolve())
    assert hub.resolve_target("other/repo@abc", cfg) == hub.PullTarget("other/repo", "abc")
    with pytest.raises(PullError) as e:
        hub.resolve_target("llama3", cfg)
    assert e.value.status == 404 and "not in the registry" in e.value.message


# --- plan --------------------------------------------------------------------


def test_plan_lists_what_vllm_needs(fake: FakeHub, tmp_path: Path) -> None:
    p = hub.plan(REPO)
    assert [f.path for f in p.files] == WANTED
    assert p.total == sum(len(FILES[f]) for f in WANTED)
    assert (p.cached, p.partial, p.to_download) == (0, 0, p.total)
    model = next(f for f in p.files if f.path == "model.safetensors")
    assert model.digest == "sha256:" + hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert model.size == 2 * 1024 * 1024
    assert p.commit == fake.repos[REPO].sha and p.revision == "main"
    assert not any(path.startswith("/org/tiny/resolve") for _, path in fake.requests), "plan downloads nothing"

    hub.pull(REPO)
    again = hub.plan(REPO)
    assert again.cached == again.total and again.to_download == 0


def test_plan_follows_the_safetensors_index(fake: FakeHub) -> None:
    """A Mistral-style repo has the sharded weights *and* a consolidated copy: only the indexed ones are pulled."""
    shards = {f"model-0000{i}-of-00002.safetensors": _weights(1000 + i, seed=i) for i in (1, 2)}
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    fake.add_repo(
        "org/sharded",
        {
            "config.json": b"{}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            "consolidated.safetensors": _weights(5000, seed=9),
            "original/params.json": b"{}",
            "sub/extra.safetensors": b"x" * 10,
            **shards,
        },
    )
    p = hub.plan("org/sharded")
    assert [f.path for f in p.files] == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "original/params.json",
    ]


def test_plan_gguf(fake: FakeHub) -> None:
    fake.add_repo("org/gguf", {"config.json": b"{}", "m.Q4_K_M.gguf": b"G" * 300, "m.Q8_0.gguf": b"G" * 600})
    with pytest.raises(PullError) as e:
        hub.plan("org/gguf")
    assert e.value.status == 400 and "--gguf" in e.value.message and "m.Q4_K_M.gguf" in e.value.message
    p = hub.plan("org/gguf", gguf="m.Q8_0.gguf")
    assert [f.path for f in p.files] == ["config.json", "m.Q8_0.gguf"] and p.total == 602
    with pytest.raises(PullError) as e:
        hub.plan("org/gguf", gguf="nope.gguf")
    assert e.value.status == 404 and "m.Q8_0.gguf" in e.value.message


def test_plan_refuses_when_the_disk_is_too_small(fake: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(PullError) as e:
        hub.pull(REPO)
    assert e.value.status == 507
    assert "not enough disk space" in e.value.message and "need 2.0 MiB" in e.value.message
    assert "1000 B free" in e.value.message and str(cache(tmp_path)) in e.value.message
    assert not fake.served, "nothing is downloaded when it cannot fit"
    assert hub.local_snapshot(REPO) is None


# --- progress ----------------------------------------------------------------


def test_ollama_status_shapes() -> None:
    assert ollama_status(Progress("manifest")) == {"status": "pulling manifest"}
    assert ollama_status(Progress("file", "a.json", "sha256:ab", 10, 4)) == {
        "status": "pulling a.json",
        "digest": "sha256:ab",
        "total": 10,
        "completed": 4,
    }
    assert ollama_status(Progress("file", "a.json", "sha256:ab", 10, 0)) == {
        "status": "pulling a.json",
        "digest": "sha256:ab",
        "total": 10,
    }
    assert ollama_status(Progress("verify")) == {"status": "verifying sha256 digest"}
    assert ollama_status(Progress("write")) == {"status": "writing manifest"}
    assert ollama_status(Progress("success")) == {"status": "success"}


def test_pull_streams_ollama_shapes_and_fills_the_cache(fake: FakeHub, tmp_path: Path) -> None:
    events, on = collect()
    path = hub.pull(REPO, on_progress=on)

    assert events[0] == {"status": "pulling manifest"}
    assert events[-3:] == [{"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]
    files = [e for e in events[1:-3]]
    assert all(set(e) <= {"status", "digest", "total", "completed"} and e["digest"].startswith("sha256:") for e in files)
    by_file: dict[str, list[dict]] = {}
    for e in files:
        by_file.setdefault(e["status"].removeprefix("pulling "), []).append(e)
    assert sorted(by_file) == WANTED
    for name, evs in by_file.items():
        done = [e.get("completed", 0) for e in evs]
        assert done == sorted(done) and done[-1] == len(FILES[name]) == evs[-1]["total"]
    # Throttled: far fewer events than the 32 chunks of the weights.
    assert len(by_file["model.safetensors"]) < 10

    # The standard cache layout, which vLLM resolves by repo id.
    st = storage(tmp_path)
    assert path == st / "snapshots" / fake.repos[REPO].sha
    assert (st / "refs" / "main").read_text() == fake.repos[REPO].sha
    assert sorted(os.listdir(path)) == WANTED
    for name in WANTED:
        assert (path / name).is_symlink() and (path / name).read_bytes() == FILES[name]
    assert (st / "blobs" / hashlib.sha256(FILES["model.safetensors"]).hexdigest()).is_file()
    assert not list((st / "blobs").glob("*.incomplete"))
    # ... which the library itself (what vLLM calls) reads offline without a request.
    before = len(fake.requests)
    assert hf_hub_download(REPO, "config.json", cache_dir=cache(tmp_path), local_files_only=True) == str(
        path / "config.json"
    )
    assert len(fake.requests) == before

    local = hub.local_snapshot(REPO)
    assert local is not None and local.complete and local.state == "complete"
    assert local.path == path and local.commit == fake.repos[REPO].sha and local.files == len(WANTED)
    assert local.size == sum(len(FILES[n]) for n in WANTED)
    assert abs(local.modified_at.timestamp() - time.time()) < 60 and local.modified_at.tzinfo is not None


def test_pull_again_downloads_nothing(fake: FakeHub) -> None:
    hub.pull(REPO)
    served = {k: list(v) for k, v in fake.served.items()}
    events, on = collect()
    hub.pull(REPO, on_progress=on)
    assert fake.served == served
    size = len(FILES["model.safetensors"])
    digest = "sha256:" + hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert {"status": "pulling model.safetensors", "digest": digest, "total": size, "completed": size} in events


def test_pull_by_revision_writes_that_ref(fake: FakeHub, tmp_path: Path) -> None:
    path = hub.pull(REPO, "v1")
    assert (storage(tmp_path) / "refs" / "v1").read_text() == path.name
    assert not (storage(tmp_path) / "refs" / "main").exists()
    assert hub.local_snapshot(REPO, "v1").complete
    assert hub.local_snapshot(REPO) is None  # main was never pulled
    assert hub.local_snapshot(REPO, path.name).complete  # by commit hash


def test_concurrent_pulls_download_once(fake: FakeHub) -> None:
    """Two pulls of one model at once (two clients, or a CLI and the server) share the blob lock."""
    fake.delay(MODEL, 0.005)
    results: list[object] = []

    def go() -> None:
        try:
            results.append(hub.pull(REPO))
        except PullError as e:  # pragma: no cover - reported by the assertion below
            results.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and results[0] == results[1] and isinstance(results[0], Path)
    assert fake.served[MODEL] == [(0, len(FILES["model.safetensors"]))]


def _held_pull(on_hold: threading.Event, release: threading.Event) -> Callable[[Progress], None]:
    """An on_progress that stops its pull's download 128 KiB into the weights until `release`: a
    pull in progress for as long as a test needs, without racing a timer."""

    def on(ev: Progress) -> None:
        if ev.file == "model.safetensors" and ev.completed >= 2 * CHUNK and not on_hold.is_set():
            on_hold.set()
            release.wait(15)

    return on


class _PullThread(threading.Thread):
    """`hub.pull` on a thread, keeping what it returned or raised."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(daemon=True)
        self.kwargs = kwargs
        self.result: object = None

    def run(self) -> None:
        try:
            self.result = hub.pull(REPO, **self.kwargs)
        except PullError as e:
            self.result = e


def test_a_second_pull_waits_for_the_first(fake: FakeHub) -> None:
    """One pull of a repo at a time (across processes too: the lock is a file). The second says it
    waits, then finds the files in place; one that is cancelled while it waits leaves the first
    alone. (Sharing the work used to let a cancelled pull mark a finished model partial.)"""
    on_hold, release = threading.Event(), threading.Event()
    first = _PullThread(on_progress=_held_pull(on_hold, release))
    first.start()
    try:
        assert on_hold.wait(10)
        cancel = threading.Event()

        def give_up(ev: Progress) -> None:
            if ev.kind == "wait":
                cancel.set()

        quitter = _PullThread(on_progress=give_up, cancel=cancel)
        quitter.start()
        quitter.join(10)
        assert isinstance(quitter.result, PullError) and quitter.result.status == 499

        waited = threading.Event()
        events: list[dict] = []

        def on(ev: Progress) -> None:
            events.append(ollama_status(ev))
            if ev.kind == "wait":
                waited.set()

        second = _PullThread(on_progress=on)
        second.start()
        assert waited.wait(10), events
    finally:
        release.set()
    first.join(30)
    second.join(30)
    assert isinstance(first.result, Path) and second.result == first.result
    assert {"status": "waiting for another pull of this model to finish"} in events
    assert events[-1] == {"status": "success"}
    assert fake.served[MODEL] == [(0, len(FILES["model.safetensors"]))], "downloaded once"
    assert hub.local_snapshot(REPO).state == "complete"


def test_a_cancelled_pull_beside_another_leaves_the_model_complete(fake: FakeHub) -> None:
    """Two pulls of one revision, the second cancelled: here it planned before the first finished
    and runs after it. It used to write its pending manifest over the finished one, so the model
    showed as partial until pulled again."""
    late = hub.plan(REPO)  # nothing cached yet
    hub.pull(REPO)
    cancel = threading.Event()

    def on(ev: Progress) -> None:
        if ev.kind == "file":
            cancel.set()

    with pytest.raises(PullError) as e:
        hub.pull(REPO, on_progress=on, cancel=cancel, pull_plan=late)
    assert e.value.status == 499
    local = hub.local_snapshot(REPO)
    assert local.state == "complete"
    assert len(fake.served[MODEL]) == 1


def test_a_pull_planned_before_a_delete_fetches_what_it_removed(fake: FakeHub) -> None:
    """A plan is made before the pull lock is taken (`vllama pull` shows it first): a delete may
    come between. The pull must not register a model whose files are gone."""
    hub.pull(REPO)
    stale = hub.plan(REPO)
    assert stale.to_download == 0
    hub.delete(REPO)
    path = hub.pull(REPO, pull_plan=stale)
    assert hub.local_snapshot(REPO).state == "complete"
    for name in WANTED:
        assert (path / name).read_bytes() == FILES[name]


def test_locks_fall_back_to_soft_locks_without_flock(fake: FakeHub, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """On a filesystem without flock (some NFS mounts) filelock 3.x raises NotImplementedError;
    huggingface_hub then uses a SoftFileLock (an O_EXCL lock file), and so must we."""

    class Flockless(filelock.FileLock):  # type: ignore[misc, valid-type]
        def _acquire(self) -> None:
            raise NotImplementedError("FileSystem does not appear to support flock; use SoftFileLock instead")

    monkeypatch.setattr(filelock, "FileLock", Flockless)
    assert hub.pull(REPO) == hub.local_snapshot(REPO).path
    assert hub.local_snapshot(REPO).state == "complete"

    held = hub._Lock(tmp_path / "locks" / "x.lock")
    with held:
        assert (tmp_path / "locks" / "x.lock").exists()  # a soft lock is the file itself
        with pytest.raises(filelock.Timeout):
            hub._Lock(tmp_path / "locks" / "x.lock").acquire(timeout=0)
    assert not (tmp_path / "locks" / "x.lock").exists()


def test_pull_gguf(fake: FakeHub) -> None:
    fake.add_repo("org/gguf", {"config.json": b"{}", "m.Q4_K_M.gguf": b"G" * 300, "m.Q8_0.gguf": b"G" * 600})
    path = hub.pull("org/gguf", gguf="m.Q4_K_M.gguf")
    assert sorted(os.listdir(path)) == ["config.json", "m.Q4_K_M.gguf"]
    local = hub.local_snapshot("org/gguf")
    assert local.complete and local.gguf == path / "m.Q4_K_M.gguf"


# --- resume ------------------------------------------------------------------


def test_resume_after_a_dropped_connection(fake: FakeHub) -> None:
    """The connection drops 1 MiB into the weights: the download resumes with a Range request."""
    fake.drop(MODEL, after=1024 * 1024)
    hub.pull(REPO)
    size = len(FILES["model.safetensors"])
    assert fake.served[MODEL] == [(0, 1024 * 1024), (1024 * 1024, size)]
    for name in WANTED:
        assert fake.overlaps(f"{REPO}/{name}") == 0
        assert fake.bytes_served(f"{REPO}/{name}") == len(FILES[name])


def test_failed_pull_registers_nothing_and_resumes(fake: FakeHub, tmp_path: Path) -> None:
    """The Hub fails after a drop: the pull errors out, keeps the partial blob, and the next pull
    resumes it; files finished before the failure are not fetched again."""
    fake.drop(MODEL, after=1024 * 1024)
    fake.fail(MODEL, status=503)
    with pytest.raises(PullError) as e:
        hub.pull(REPO, workers=1)
    assert e.value.status == 502 and "503" in e.value.message
    st = storage(tmp_path)
    assert not (st / "refs" / "main").exists(), "no half-registered model"
    partial = st / "blobs" / (hashlib.sha256(FILES["model.safetensors"]).hexdigest() + ".incomplete")
    assert partial.stat().st_size == 1024 * 1024
    local = hub.local_snapshot(REPO)
    assert local is not None and not local.complete and local.state == "partial"
    assert local.size >= 1024 * 1024
    p = hub.plan(REPO)
    assert p.partial == 1024 * 1024 and p.to_download == p.total - p.cached - p.partial

    hub.pull(REPO)
    size = len(FILES["model.safetensors"])
    assert fake.served[MODEL] == [(0, 1024 * 1024), (1024 * 1024, size)]
    for name in WANTED:
        assert fake.overlaps(f"{REPO}/{name}") == 0, name
    assert fake.served[f"{REPO}/config.json"] == [(0, len(FILES["config.json"]))]
    assert hub.local_snapshot(REPO).complete
    assert not partial.exists()


def test_cancel_keeps_the_partial_for_the_next_pull(fake: FakeHub, tmp_path: Path) -> None:
    fake.delay(MODEL, 0.02)
    cancel = threading.Event()
    seen = threading.Event()

    def on(ev: Progress) -> None:
        if ev.file == "model.safetensors" and ev.completed >= 4 * CHUNK:
            seen.set()
            cancel.set()

    with pytest.raises(PullError) as e:
        hub.pull(REPO, on_progress=on, cancel=cancel)
    assert e.value.status == 499 and seen.is_set()
    assert not (storage(tmp_path) / "refs" / "main").exists()
    partial = storage(tmp_path) / "blobs" / (hashlib.sha256(FILES["model.safetensors"]).hexdigest() + ".incomplete")
    kept = partial.stat().st_size
    assert kept >= 4 * CHUNK, "every byte received is kept"
    fake._delay.clear()
    fake.wait_idle()
    hub.pull(REPO)
    # The next pull asks for exactly the rest. (The server may have pushed a few more chunks
    # into the socket before it saw the connection close: those are sent twice, never read twice.)
    ranges = sorted(fake.served[MODEL])  # recorded when each response ends, in any order
    assert len(ranges) == 2 and ranges[1] == (kept, len(FILES["model.safetensors"]))
    assert fake.overlaps(MODEL) == ranges[0][1] - kept <= 8 * CHUNK


def test_ctrl_c_stops_the_download(fake: FakeHub, tmp_path: Path) -> None:
    """Ctrl-C in `vllama pull` interrupts the main thread; the files in flight must stop too, not
    run to their end while the thread pool is shut down (and the partial is kept for a resume)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    fake.delay(MODEL, 0.05)
    main = threading.main_thread().ident
    sent = threading.Event()

    def on(ev: Progress) -> None:
        if ev.file == "model.safetensors" and ev.completed >= 2 * CHUNK and not sent.is_set():
            sent.set()
            signal.pthread_kill(main, signal.SIGINT)

    try:
        with pytest.raises(KeyboardInterrupt):
            hub.pull(REPO, on_progress=on)
    finally:
        signal.signal(signal.SIGINT, old)
    assert not any(t.name.startswith("vllama-pull") for t in threading.enumerate())
    fake._delay.clear()
    fake.wait_idle()
    assert fake.bytes_served(MODEL) < len(FILES["model.safetensors"]) // 2
    partial = storage(tmp_path) / "blobs" / (hashlib.sha256(FILES["model.safetensors"]).hexdigest() + ".incomplete")
    assert partial.stat().st_size >= 2 * CHUNK
    assert not (storage(tmp_path) / "refs" / "main").exists()


def test_corrupt_download_is_deleted(fake: FakeHub, tmp_path: Path) -> None:
    p = hub.plan(REPO)
    fake.repos[REPO].files["model.safetensors"].data = _weights(2 * 1024 * 1024, seed=1)  # changed behind our back
    with pytest.raises(PullError) as e:
        hub.pull(REPO, pull_plan=p)
    assert e.value.status == 502 and "does not match its digest" in e.value.message
    assert not list((storage(tmp_path) / "blobs").glob("*.incomplete"))
    assert not (storage(tmp_path) / "refs" / "main").exists()


# --- errors ------------------------------------------------------------------


def test_repository_not_found(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PullError) as e:
        hub.pull("org/missing")
    assert e.value.status == 404
    assert "repository 'org/missing' not found" in e.value.message and "HF_TOKEN" in e.value.message
    monkeypatch.setenv("HF_TOKEN", "hf_x")  # the Hub answers 404 rather than 401 to a logged-in user
    with pytest.raises(PullError) as e:
        hub.plan("org/missing")
    assert e.value.status == 404 and "not found" in e.value.message


def test_revision_not_found(fake: FakeHub) -> None:
    with pytest.raises(PullError) as e:
        hub.pull(REPO, "nope")
    assert e.value.status == 404 and e.value.message == "revision 'nope' not found in repository 'org/tiny'"


def test_gated_repository(fake: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.add_repo("org/gated", FILES, gated=True, tokens={"hf_good"})
    with pytest.raises(PullError) as e:
        hub.pull("org/gated")
    assert e.value.status == 401
    assert "gated" in e.value.message and "licence" in e.value.message and "HF_TOKEN" in e.value.message
    assert f"{fake.url}/org/gated" in e.value.message
    assert not fake.served, "the refusal comes before any download"

    monkeypatch.setenv("HF_TOKEN", "hf_bad")
    with pytest.raises(PullError) as e:
        hub.pull("org/gated")
    assert e.value.status == 403 and "no access" in e.value.message

    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert (hub.pull("org/gated") / "config.json").read_bytes() == FILES["config.json"]


def test_network_unreachable(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(PullError) as e:
        hub.pull(REPO)
    assert e.value.status == 503
    assert "cannot reach" in e.value.message and "HF_ENDPOINT" in e.value.message
    assert "HF_HUB_OFFLINE" in e.value.message


def test_error_mapping_of_disk_full() -> None:
    env = hub.hub_env()
    err = hub._hub_error(OSError(errno.ENOSPC, "No space left on device"), REPO, None, env)
    assert err.status == 507 and "disk full" in err.message


# --- offline -----------------------------------------------------------------


def test_offline_with_a_populated_cache(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    path = hub.pull(REPO)
    requests = len(fake.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # would fail if anything were asked
    events, on = collect()
    assert hub.pull(REPO, on_progress=on) == path
    assert events[0] == {"status": "pulling manifest"} and events[-1] == {"status": "success"}
    assert len(fake.requests) == requests
    assert hub.plan(REPO).to_download == 0


def test_offline_with_an_empty_cache(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PullError) as e:
        hub.pull(REPO)
    assert e.value.status == 503 and "HF_HUB_OFFLINE" in e.value.message and "not complete in the cache" in e.value.message
    assert not fake.requests


# --- delete ------------------------------------------------------------------


def test_delete(fake: FakeHub, tmp_path: Path) -> None:
    hub.pull(REPO)
    total = hub.plan(REPO).total
    assert hub.delete(REPO) == total
    assert hub.local_snapshot(REPO) is None
    with pytest.raises(PullError) as e:
        hub.delete(REPO)
    assert e.value.status == 404 and "not in the cache" in e.value.message


def test_delete_one_revision_keeps_shared_blobs(fake: FakeHub, tmp_path: Path) -> None:
    hub.pull(REPO)
    other = dict(FILES, **{"config.json": b'{"model_type": "llama", "v": 2}'})
    fake.add_repo(REPO, other)  # main moves to a new commit sharing the weights
    hub.pull(REPO, fake.repos[REPO].sha)
    old = (storage(tmp_path) / "refs" / "main").read_text()
    # Only the old config differs: the weights stay for the other revision.
    assert hub.delete(REPO, old) == len(FILES["config.json"])
    assert hub.local_snapshot(REPO, fake.repos[REPO].sha).complete
    with pytest.raises(PullError):
        hub.delete(REPO, "nope")
    assert hub.delete(REPO, all_revisions=True) > 2 * 1024 * 1024
    assert not storage(tmp_path).exists()


def test_delete_an_unfinished_pull(fake: FakeHub, tmp_path: Path) -> None:
    """`vllama list` shows an interrupted pull as a partial model; `vllama rm` / /api/delete must
    remove it (before any file was linked too, when scan_cache_dir calls the folder corrupt)."""
    fake.drop(MODEL, after=1024 * 1024)
    fake.fail(MODEL, status=503)
    with pytest.raises(PullError):
        hub.pull(REPO, workers=1)  # the small files are linked, the weights are half there
    local = hub.local_snapshot(REPO)
    assert local.state == "partial" and local.files >= 1
    linked = sum(len(FILES[q.name]) for q in local.path.iterdir())
    assert hub.delete(REPO) == 1024 * 1024 + linked
    assert hub.local_snapshot(REPO) is None and not storage(tmp_path).exists()

    fake.add_repo("org/weights", {"model.safetensors": FILES["model.safetensors"]})
    fake.drop("org/weights/model.safetensors", after=1024 * 1024)
    fake.fail("org/weights/model.safetensors", status=503)
    with pytest.raises(PullError):
        hub.pull("org/weights")  # nothing linked yet: no snapshots/ at all
    assert hub.local_snapshot("org/weights").state == "partial"
    assert hub.delete("org/weights") == 1024 * 1024
    assert hub.local_snapshot("org/weights") is None and not storage(tmp_path, "org/weights").exists()
    with pytest.raises(PullError) as e:
        hub.delete("org/weights")
    assert e.value.status == 404


def test_delete_during_a_pull_is_refused_at_once(fake: FakeHub, tmp_path: Path) -> None:
    """A delete while the repo is being pulled (here or by another process) fails fast with 409
    and leaves the pull's files alone; the pull finishes, and then the delete works."""
    on_hold, release = threading.Event(), threading.Event()
    puller = _PullThread(on_progress=_held_pull(on_hold, release))
    puller.start()
    try:
        assert on_hold.wait(10)
        started = time.monotonic()
        with pytest.raises(PullError) as e:
            hub.delete(REPO)
        assert time.monotonic() - started < 2, "fails fast, does not wait for the pull"
        assert e.value.status == 409 and "being pulled" in e.value.message and REPO in e.value.message
        partial = storage(tmp_path) / "blobs" / (hashlib.sha256(FILES["model.safetensors"]).hexdigest() + ".incomplete")
        assert partial.stat().st_size >= 2 * CHUNK, "the pull's partial file is untouched"
    finally:
        release.set()
    puller.join(30)
    assert isinstance(puller.result, Path)
    assert hub.local_snapshot(REPO).state == "complete"
    assert hub.delete(REPO) == hub.plan(REPO).total
    assert hub.local_snapshot(REPO) is None


# --- local state -------------------------------------------------------------


def test_local_snapshot_of_a_directory_and_of_other_tools_caches(fake: FakeHub, tmp_path: Path) -> None:
    d = tmp_path / "mymodel"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"w" * 100)
    local = hub.local_snapshot(str(d))
    assert local is not None and local.complete and local.size == 102 and local.commit is None
    assert hub.local_snapshot(str(tmp_path / "absent")) is None
    assert hub.local_snapshot("org/never-pulled") is None

    # A cache filled by the library itself (as vLLM or `hf download` would): no manifest of ours.
    snapshot_download(REPO, endpoint=fake.url, cache_dir=cache(tmp_path))
    local = hub.local_snapshot(REPO)
    assert local is not None and local.complete
    assert local.size == sum(len(v) for v in FILES.values())


# --- async wrapper -----------------------------------------------------------


async def test_pull_events(fake: FakeHub) -> None:
    events = [e async for e in hub.pull_events(REPO)]
    assert events[0] == {"status": "pulling manifest"} and events[-1] == {"status": "success"}
    assert {"status": "verifying sha256 digest"} in events


async def test_pull_events_errors(fake: FakeHub) -> None:
    events = [e async for e in hub.pull_events("org/missing")]
    assert events[0] == {"status": "pulling manifest"}
    assert events[-1].keys() == {"error"} and "not found" in events[-1]["error"]
    with pytest.raises(PullError) as e:
        async for _ in hub.pull_events("org/missing", raise_errors=True):
            pass
    assert e.value.status == 404


async def test_closing_pull_events_cancels_the_download(fake: FakeHub, tmp_path: Path) -> None:
    fake.delay(MODEL, 0.02)
    gen = hub.pull_events(REPO)
    async for ev in gen:
        if ev.get("status") == "pulling model.safetensors" and ev.get("completed", 0) >= 2 * CHUNK:
            break
    await gen.aclose()  # the client went away
    deadline = time.monotonic() + 10
    while any(t.name.startswith("vllama-pull") for t in threading.enumerate()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(t.name.startswith("vllama-pull") for t in threading.enumerate())
    await asyncio.to_thread(fake.wait_idle)
    assert fake.bytes_served(MODEL) < len(FILES["model.safetensors"])
    assert not (storage(tmp_path) / "refs" / "main").exists()


# --- the routes ----------------------------------------------------------------


@pytest.fixture
def served(fake: FakeHub) -> Iterator[ServedRouter]:
    """The router with /api/pull and /api/delete, a Hub model `manual` (auto_pull off) in its registry."""
    r = ServedRouter({"models": [{"name": "manual", "source": REPO, "auto_pull": False, "load": "on_demand"}]},
                     admin=True).start()
    yield r
    r.stop()


def test_api_delete_of_a_missing_model(fake: FakeHub, served: ServedRouter, tmp_path: Path) -> None:
    """`missing` (not downloaded, or only partly) runs nothing: deleting its leftovers is no conflict."""
    from router.lifecycle import State

    fake.drop(MODEL, after=1024 * 1024)
    fake.fail(MODEL, status=503)
    with pytest.raises(PullError):
        hub.pull(REPO)
    rt = served.fleet.runtimes["manual:latest"]
    served.call(served.fleet._set(rt, State.MISSING, "not downloaded"))
    r = httpx.request("DELETE", served.url + "/api/delete", json={"model": "manual"})
    assert r.status_code == 200, r.text
    assert hub.local_snapshot(REPO) is None


def test_api_delete_during_a_pull_is_a_conflict(fake: FakeHub, served: ServedRouter) -> None:
    """/api/delete of a repo being pulled (here by `vllama pull` in another process, or /api/pull)
    answers 409 with Ollama's error shape at once, and the pull goes on to completion."""
    on_hold, release = threading.Event(), threading.Event()
    puller = _PullThread(on_progress=_held_pull(on_hold, release))
    puller.start()
    try:
        assert on_hold.wait(10)
        r = httpx.request("DELETE", served.url + "/api/delete", json={"model": REPO}, timeout=10)
        assert r.status_code == 409, r.text
        assert r.json().keys() == {"error"} and "being pulled" in r.json()["error"]
    finally:
        release.set()
    puller.join(30)
    assert isinstance(puller.result, Path) and hub.local_snapshot(REPO).state == "complete"


def _set_state(served: ServedRouter, name: str, state: str) -> None:
    from router.lifecycle import State

    served.call(served.fleet._set(served.fleet.runtimes[name], State(state), "set by the test"))


def _delete(served: ServedRouter, model: str) -> httpx.Response:
    return httpx.request("DELETE", served.url + "/api/delete", json={"model": model}, timeout=10)


def test_api_delete_by_repo_id_is_refused_while_the_model_runs(fake: FakeHub, served: ServedRouter) -> None:
    """Sending the model's `source` instead of its name skipped the 409 and deleted the files of a
    ready model (QA finding 1); so did a revision that is the same snapshot, and a URL form."""
    hub.pull(REPO)
    hub.pull(REPO, "v1")  # v1 is main's commit
    _set_state(served, "manual:latest", "ready")
    for asked in (REPO, f"{REPO}@main", f"{REPO}@v1", f"hf.co/{REPO}", "manual"):
        r = _delete(served, asked)
        assert r.status_code == 409, (asked, r.text)
        assert r.json().keys() == {"error"} and "stop it first (`vllama stop manual:latest`)" in r.json()["error"]
    assert hub.local_snapshot(REPO).complete, "the running model's files are untouched"
    _set_state(served, "manual:latest", "stopped")
    r = _delete(served, REPO)
    assert r.status_code == 200, r.text
    assert hub.local_snapshot(REPO) is None


def test_api_delete_is_refused_while_another_entry_serves_the_files(fake: FakeHub) -> None:
    """Two registry names over one repo: deleting the stopped one would pull the files from under
    the running one."""
    hub.pull(REPO)
    r = ServedRouter({"models": [{"name": "a", "source": REPO, "auto_pull": False, "load": "on_demand"},
                                 {"name": "b", "source": REPO, "revision": "main", "auto_pull": False,
                                  "load": "on_demand"}]}, admin=True).start()
    try:
        _set_state(r, "a:latest", "ready")
        resp = _delete(r, "b")
        assert (resp.status_code, resp.json()) == (409, {"error": f'model "a:latest" serves {REPO} and is ready; '
                                                                  "stop it first (`vllama stop a:latest`)"})
        assert hub.local_snapshot(REPO).complete
    finally:
        r.stop()


def test_api_delete_answers_an_empty_body(fake: FakeHub, served: ServedRouter) -> None:
    """Ollama: 200 with an empty body (it was the JSON `null`)."""
    hub.pull(REPO)
    r = _delete(served, "manual")
    assert (r.status_code, r.content) == (200, b"")


@pytest.mark.parametrize("asked", ["nope", "llama3.2:3b", "org/never-pulled", "org/never-pulled@v2", REPO])
def test_api_delete_of_an_unknown_model_is_ollamas_not_found(fake: FakeHub, served: ServedRouter,
                                                             tmp_path: Path, asked: str) -> None:
    """Was `nope is not in the cache at /root/.cache/huggingface/hub`: no "not found", and the
    server's cache path (or a 400 "invalid model name" for an Ollama name with a tag)."""
    r = _delete(served, asked)
    assert (r.status_code, r.json()) == (404, {"error": f"model '{asked}' not found"})
    assert str(tmp_path) not in r.text


def test_api_delete_of_a_local_directory_model(fake: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    r = ServedRouter({"models": [{"name": "mine", "source": str(tmp_path / "mine")}]}, admin=True).start()
    try:
        resp = _delete(r, "mine")
        assert (resp.status_code, resp.json()) == (400, {"error": 'model "mine:latest" is a local directory; '
                                                                  "vLLama does not delete it"})
        assert (tmp_path / "mine").is_dir()
    finally:
        r.stop()


def test_api_pull_of_a_local_directory_streams_unless_told_not_to(fake: FakeHub, tmp_path: Path) -> None:
    """It answered one application/json body even with `stream` true (the default); Ollama streams NDJSON."""
    (tmp_path / "mine").mkdir()
    r = ServedRouter({"models": [{"name": "mine", "source": str(tmp_path / "mine")},
                                 {"name": "gone", "source": str(tmp_path / "gone")}]}, admin=True).start()
    try:
        for body in ({"model": "mine"}, {"model": "mine", "stream": True}):
            resp = httpx.post(r.url + "/api/pull", json=body, timeout=10)
            assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-ndjson"
            assert [json.loads(x) for x in resp.text.splitlines()] == [{"status": "pulling manifest"},
                                                                        {"status": "success"}]
        resp = httpx.post(r.url + "/api/pull", json={"model": "mine", "stream": False}, timeout=10)
        assert resp.headers["content-type"] == "application/json" and resp.json() == {"status": "success"}
        resp = httpx.post(r.url + "/api/pull", json={"model": "gone"}, timeout=10)
        assert resp.status_code == 404 and "does not exist" in resp.json()["error"]
        assert str(tmp_path) not in resp.text
    finally:
        r.stop()


def test_delete_target(tmp_path: Path) -> None:
    cfg = parse_config({"models": [{"name": "tiny", "source": "org/tiny", "revision": "v1"},
                                   {"name": "g", "source": "gpt2"},
                                   {"name": "far", "source": "org/far", "url": "http://127.0.0.1:9/v1"}]},
                       base_dir=tmp_path)
    assert hub.delete_target("tiny", cfg) == hub.PullTarget("org/tiny", "v1", "tiny:latest")
    assert hub.delete_target("org/tiny@v2", cfg) == hub.PullTarget("org/tiny", "v2")
    assert hub.delete_target("gpt2", cfg) == hub.PullTarget("gpt2", None), "a plain name that is a source"
    for name, status in (("nope", 404), ("gpt2", 404), ("far", 400), ("org/x:v2", 400)):
        with pytest.raises(PullError) as e:
            hub.delete_target(name, cfg if name != "gpt2" else None)
        assert e.value.status == status, name


def test_api_pull_without_stream_stops_when_the_client_goes_away(fake: FakeHub, served: ServedRouter) -> None:
    """As in Ollama (the pull runs on the request's context) and as a streamed pull here does."""
    fake.delay(MODEL, 0.1)  # ~3 s for the weights
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/api/pull", json={"model": REPO, "stream": False}, timeout=0.8)
    deadline = time.monotonic() + 10
    while any(t.name.startswith("vllama-pull") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    fake.wait_idle()
    assert fake.bytes_served(MODEL) < len(FILES["model.safetensors"])
    assert hub.local_snapshot(REPO).state == "partial"


def test_api_pull_shapes(fake: FakeHub, served: ServedRouter) -> None:
    r = httpx.post(served.url + "/api/pull", json={"model": "manual", "stream": False}, timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "success"}
    lines = [json.loads(x) for x in httpx.post(served.url + "/api/pull", json={"model": "manual"}, timeout=30).text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1] == {"status": "success"}
    r = httpx.post(served.url + "/api/pull", json={"model": "org/missing", "stream": False}, timeout=30)
    assert r.status_code == 404 and "not found" in r.json()["error"]
    lines = [json.loads(x) for x in httpx.post(served.url + "/api/pull", json={"model": "org/missing"}, timeout=30).text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and lines[-1].keys() == {"error"}


# --- CLI rendering -----------------------------------------------------------


def test_render_pull(fake: FakeHub) -> None:
    from rich.console import Console

    out = io.StringIO()
    path = hub.render_pull(REPO, None, None, Console(file=out, width=1000, force_terminal=False))
    text = out.getvalue()
    assert "org/tiny" in text and "5 files" in text and "2.0 MiB" in text and "to download" in text
    assert "model.safetensors" in text and "success" in text and str(path) in text


def test_pull_bars_use_binary_units_throughout() -> None:
    """Sizes were in MiB and rates in MB/s (rich's TransferSpeedColumn is decimal only)."""
    from rich.console import Console

    now = [0.0]
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    with hub._bars(console, get_time=lambda: now[0]) as bars:
        task = bars.add_task("model.safetensors", total=3 << 20)
        for _ in range(2):
            now[0] += 1.0
            bars.update(task, advance=1 << 20)
        line = " ".join(str(c.render(bars.tasks[0])) for c in bars.columns[2:4])
    assert line == "2.0/3.0 MiB 1.0 MiB/s"


def test_render_pull_says_when_it_waits_for_another_pull(fake: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    on_hold, release = threading.Event(), threading.Event()
    puller = _PullThread(on_progress=_held_pull(on_hold, release))
    puller.start()
    real = hub.pull

    def pull(repo: str, revision: str | None, gguf: str | None, on_progress: Callable[[Progress], None],
             **kwargs: object) -> Path:
        def on(ev: Progress) -> None:
            on_progress(ev)
            if ev.kind == "wait":
                release.set()  # the first pull goes on once the second is known to wait for it

        return real(repo, revision, gguf, on, **kwargs)

    monkeypatch.setattr(hub, "pull", pull)
    out = io.StringIO()
    try:
        assert on_hold.wait(10)
        hub.render_pull(REPO, None, None, Console(file=out, width=1000, force_terminal=False))
    finally:
        release.set()
        puller.join(30)
    text = out.getvalue()
    assert "waiting for another pull of org/tiny" in text and "success" in text
    assert not re.search(r"\b[kMG]B/s", text), text


# --- the fake itself ---------------------------------------------------------


def test_fakehub_speaks_hub_to_the_library(fake: FakeHub, tmp_path: Path) -> None:
    """The fake must be faithful for these tests to mean anything: the library's own calls work on it."""
    path = snapshot_download(REPO, endpoint=fake.url, cache_dir=tmp_path / "lib", allow_patterns=["*.json"])
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    fake.add_repo("org/gated", FILES, gated=True)
    with pytest.raises(hf_errors.GatedRepoError):
        hf_hub_download("org/gated", "config.json", endpoint=fake.url, cache_dir=tmp_path / "lib")
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", endpoint=fake.url, cache_dir=tmp_path / "lib")
    with pytest.raises(hf_errors.RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope", endpoint=fake.url, cache_dir=tmp_path / "lib")
    with pytest.raises(hf_errors.RemoteEntryNotFoundError):
        hf_hub_download(REPO, "nope.json", endpoint=fake.url, cache_dir=tmp_path / "lib")


def test_api_delete_of_a_remote_model_says_it_has_no_files_here(fake: FakeHub) -> None:
    """Not "is ready; stop it first": a `url:` model cannot be stopped from here, and has no files here."""
    hub.pull(REPO)
    r = ServedRouter({"models": [{"name": "far", "source": REPO, "url": "http://127.0.0.1:9/v1"}]}, admin=True).start()
    try:
        resp = httpx.request("DELETE", r.url + "/api/delete", json={"model": "far"})
        assert (resp.status_code, resp.json()) == (400, {"error": 'model "far:latest" is served by '
                                                                   'http://127.0.0.1:9/v1; it has no files here'})
        assert hub.local_snapshot(REPO) is not None  # the cache is left alone
    finally:
        r.stop()


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full at the ref's write: a stray temp file in refs/ would make scan_cache_dir call the repo corrupt."""
    def full(self: Path, *_: object, **__: object) -> int:
        Path.write_bytes(self, b"par")  # some bytes made it
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space"):
        hub._write_atomic(tmp_path / "refs" / "main", "0" * 40)
    assert list((tmp_path / "refs").iterdir()) == []
