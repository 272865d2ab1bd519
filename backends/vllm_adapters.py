"""Which LoRA adapters the vLLM server holds, and the names it holds them under.

A name is never reused for other weights: vLLM keys its prefix cache by the adapter's name, so a same-name reload
of changed weights can serve KV blocks computed with the old ones (vllm issue 42125). A name is therefore derived
from the adapter folder's resolved path *and* a digest of its files: the same name always means the same weights,
and an adapter retrained in place (a failed job run again) gets a new one.

The server has `max_loras` slots; loading past them would evict an adapter silently. So the slots here load what
a chat call needs, unloading first the adapters used longest ago, and a call that needs more adapters than there
are slots is refused with the setting to change.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from foundation.errors import UserError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def content_digest(folder: Path) -> str:
    """sha256 over the adapter's config and weights (names and bytes), in a fixed order."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0")
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def served_name(folder: Path) -> str:
    """The name an adapter is served under: `maft-<path digest>-<content digest>`."""
    resolved = folder.expanduser().resolve()
    where = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    return f"maft-{where}-{content_digest(resolved)[:16]}"


class AdapterServer(Protocol):
    """What the slots need of a server (`vllm_server.VLLMAdmin` has it)."""

    def load_adapter(self, name: str, path: Path) -> None: ...

    def unload_adapter(self, name: str) -> None: ...


class AdapterSlots:
    """The adapters loaded on one server, most recently used last; at most `capacity` of them."""

    def __init__(self, server: AdapterServer, capacity: int) -> None:
        self.server = server
        self.capacity = capacity
        self._loaded: OrderedDict[str, Path] = OrderedDict()  # served name -> folder
        self._names: dict[tuple[Path, int, int], str] = {}  # (folder, mtime_ns, size) of its weights -> name

    @property
    def loaded(self) -> dict[str, Path]:
        return dict(self._loaded)

    def name_for(self, folder: Path) -> str:
        """`served_name`, remembered while the folder's files are unchanged (a digest reads every byte)."""
        folder = folder.expanduser().resolve()
        stats = [(folder / n).stat() for n in ADAPTER_FILES if (folder / n).is_file()]
        mark = (folder, max((s.st_mtime_ns for s in stats), default=0), sum(s.st_size for s in stats))
        if mark not in self._names:
            self._names[mark] = served_name(folder)
        return self._names[mark]

    def ensure(self, folders: Iterable[Path]) -> dict[Path, str]:
        """Every folder loaded (each folder's served name, by folder); the least recently used others are
        unloaded to make room."""
        wanted = {folder.expanduser().resolve(): None for folder in folders}
        names = {folder: self.name_for(folder) for folder in wanted}
        if len(set(names.values())) > self.capacity:
            raise UserError(f"one batch of requests needs {len(names)} LoRA adapters at once but [vllm] max_loras is "
                            f"{self.capacity}: set [vllm] max_loras = {len(names)} or more")
        needed = set(names.values())
        missing = [name for name in dict.fromkeys(names.values()) if name not in self._loaded]
        spare = [name for name in self._loaded if name not in needed]  # oldest first
        while len(self._loaded) + len(missing) > self.capacity:
            self.unload(spare.pop(0))
        for folder, name in names.items():
            if name in self._loaded:
                self._loaded.move_to_end(name)
            else:
                self.server.load_adapter(name, folder)
                self._loaded[name] = folder
        return names

    def unload(self, name: str) -> None:
        self.server.unload_adapter(name)
        self._loaded.pop(name, None)

    def unload_all(self) -> None:
        for name in list(self._loaded):
            self.unload(name)
