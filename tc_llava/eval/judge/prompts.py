"""Judge prompts as data: pinned text from ``configs/judge/prompts/*.yaml``, hashed into cache names."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class PromptTemplate:
    """One judge prompt: system text, user template with ``{field}`` slots, reply schema."""

    name: str
    system: str
    user: str
    schema: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        """Record keys the templates read, in order of first use."""
        found = _PLACEHOLDER.findall(self.system + "\n" + self.user)
        return tuple(dict.fromkeys(found))

    @property
    def sha(self) -> str:
        """Short hash of the exact prompt bytes and schema: part of the cache file name."""
        blob = json.dumps([self.system, self.user, list(self.schema)], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def render(self, record: Mapping[str, Any], item_id: str = "?") -> list[dict[str, str]]:
        """Chat messages for one record; values are inserted verbatim, in a single pass."""
        missing = [f for f in self.fields if f not in record]
        if missing:
            raise KeyError(
                f"prompt {self.name!r}: item {item_id!r} lacks field(s) {missing}; "
                f"expected keys {list(self.fields)}, got {sorted(record)}"
            )

        def fill(template: str) -> str:
            return _PLACEHOLDER.sub(
                lambda m: str(record[m[1]]) if m[1] in record else m[0], template
            )

        return [
            {"role": "system", "content": fill(self.system)},
            {"role": "user", "content": fill(self.user)},
        ]


def load_prompts(path: str | os.PathLike) -> dict[str, PromptTemplate]:
    """Read a prompt file (``configs/judge/prompts/*.yaml``): ``schema`` + ``prompts``."""
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    schema = cfg.get("schema") if isinstance(cfg, dict) else None
    prompts = cfg.get("prompts") if isinstance(cfg, dict) else None
    if not schema or not isinstance(prompts, dict) or not prompts:
        raise ValueError(f"{path}: expected top-level 'schema' (list) and 'prompts' (mapping)")
    out = {}
    for name, spec in prompts.items():
        if not isinstance(spec, dict) or not all(
            isinstance(spec.get(k), str) for k in ("system", "user")
        ):
            raise ValueError(f"{path}: prompts.{name} needs string fields 'system' and 'user'")
        out[name] = PromptTemplate(name, spec["system"], spec["user"], tuple(schema))
    return out
