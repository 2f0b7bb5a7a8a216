"""What supervisord's configuration can carry: the one rule both sides use.

`config` refuses a registry whose arguments, environment or state dir supervisord could
not be handed (so `vllama check` and a reload report it, naming the key), and
`supervisor` refuses the same values when it renders a program (so nothing corrupt is
ever written). Both ask the functions here; each returns why a value cannot be carried,
or None. Nothing from the package is imported: config.py (validation) stays free of
process control and supervisor.py of the registry.

supervisord reads its files line by line in text mode (``\\n`` and ``\\r`` both end a
line), writes them as UTF-8, expands ``%``, and cuts a line at ``;`` or ``#`` after
whitespace. ``command=`` is split with POSIX shlex, which `supervisor.quote_arg` quotes
around all of that but a line break; ``environment=`` with a non-POSIX shlex, where a
value in ``"..."`` cannot hold ``"`` nor escape a comment character.
"""

from __future__ import annotations

import re

#: The unix socket's name in the state dir (`supervisor.Paths.socket`).
SOCKET_NAME = "supervisor.sock"
#: Longest socket path accepted: AF_UNIX allows 107 bytes, kept with a margin.
MAX_SOCKET_PATH = 100

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT = re.compile(r"\s[;#]")


def is_env_name(name: str) -> bool:
    """A name supervisord's ``environment=`` (and a POSIX shell) accepts."""
    return _ENV_NAME.fullmatch(name) is not None


def arg_problem(arg: str) -> str | None:
    """Why one argv element cannot go on a ``command=`` line, or None."""
    if "\n" in arg or "\r" in arg or "\x00" in arg:
        return "must not contain newlines, carriage returns or NUL (supervisord cannot carry them)"
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it holds a lone surrogate)"
    return None


def env_value_problem(value: str) -> str | None:
    """Why an environment value cannot go in ``environment=``, or None."""
    if problem := arg_problem(value):
        return problem
    if '"' in value:
        return 'must not contain " (supervisord cannot carry it)'
    if _COMMENT.search(value):
        return "must not have ; or # after whitespace (supervisord reads the rest as a comment)"
    return None


def state_dir_problem(path: str) -> str | None:
    """Why a state dir cannot hold supervisord's socket, files and ``[include]``, or None.

    The dir is an environment value of every program, a path in ``files =`` (split at
    whitespace) and in ``%``-expanded options, and the socket lives in it.
    """
    if problem := env_value_problem(path):
        return problem
    if re.search(r"\s", path):
        return "must not contain whitespace (supervisord's [include] splits paths at it)"
    if "%" in path:
        return "must not contain % (supervisord expands it in paths)"
    socket = f"{path.rstrip('/')}/{SOCKET_NAME}"
    if len(socket.encode()) > MAX_SOCKET_PATH:
        return f"is too long: its unix socket path would be {len(socket.encode())} bytes, over {MAX_SOCKET_PATH}"
    return None
