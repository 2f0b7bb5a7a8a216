"""What the registry's models are, as Ollama's listing endpoints describe them.

Facts come from the model's own files (a local directory or the Hugging Face
cache): size on disk, modification time, a digest of the files. Nothing is
invented; what cannot be read is left empty.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

from . import wire
from .config import Config, Model, is_local_source


def _local_dir(config: Config, model: Model) -> Path | None:
    if is_local_source(model.source):
        p = Path(config.source_path(model))
        return p if p.is_dir() else None
    return None


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def _digest(files: list[Path], root: Path) -> str:
    """sha256 over the files' names, sizes and mtimes: changes whenever the model does."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _family(d: Path) -> str:
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(cfg.get("model_type") or "")


class Catalog:
    def __init__(self, config: Config) -> None:
        self.config = config

    def listed(self, model: Model) -> wire.ListedModel:
        d = _local_dir(self.config, model)
        size, mtime, digest, family = 0, 0.0, "", ""
        if d is not None:
            files = _files(d)
            size = sum(f.stat().st_size for f in files)
            mtime = max((f.stat().st_mtime for f in files), default=d.stat().st_mtime)
            digest = _digest(files, d)
            family = _family(d)
        modified = datetime.fromtimestamp(mtime or os.path.getmtime(self.config.path or "."))
        return wire.ListedModel(
            name=model.name,
            model=model.name,
            modified_at=modified.astimezone().isoformat(),
            size=size,
            digest=digest,
            details=wire.ModelDetails(format="safetensors", family=family, families=[family] if family else None),
        )

    def tags(self) -> wire.TagsResponse:
        return wire.TagsResponse(models=[self.listed(m) for m in self.config.models])
