"""Block checkpoints: what the block-wise engine needs to continue a run that was killed.

After every block group of a lazy model (``harness.models.lazy``) the engine has on disk, under the
run's work directory:

- ``blocks/block_<i>.safetensors``: the finished blocks' tensors (written by the block store),
- ``blocks/block_<i>.structure.pt``: each finished block's module *structure* on the meta device
  (``QuantLinear``s, QLLM's wrappers; no tensors), which a fresh process cannot rebuild otherwise,
- ``engine/state_<n>.safetensors``: the next group's FP and student inputs (none in a run without
  calibration data), the method's state tensors (``BlockHooks.state``) and the torch RNG state,
- ``engine/state.json``, the manifest: the run key, the index ``n`` of the next group, the finished
  jobs' stats (as the result JSON will hold them: ``default=str``) and, for every finished block,
  its two files' sizes and digests (the sha256 of the safetensors header, of the structure file);
  written last (tmp file + rename), so it always names files that were complete when it was written.

A run started again finds ``state.json`` and checks it before trusting it (``Checkpoint.load``):
it must belong to the same run key, and every block it names must exist with the recorded size
and digests (a header read, not the weights), as must the state file. It then restores the
buffers, the RNG, the stats and the finished blocks' structure, and continues with group ``n``:
its result equals an uninterrupted run's bit for bit (same seed, same device). A checkpoint that
fails a check is logged in one line (which file, why) and the run starts from block 0: the engine
keeps the activations of its last group only (they are the size of the calibration set, too large
to keep per group), so no earlier point can be continued from. Structure files are pickles, read
back with torch's restricted unpickler (``weights_only=True``) that admits only the classes the
file names from torch, transformers, harness and the packages of registered methods (a plugin
method's own module classes included); a file naming anything else is refused with the class it names.

Test hooks (``harness.runtime``): ``block:N`` right after the checkpoint of the group starting
at block N, ``mid:N`` in the middle of that group (after the method processed it, before anything
of it is written).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.errors import PtqbenchError, ResourceUnavailableError
from harness.fingerprint import safetensors_header

log = logging.getLogger(__name__)


class CheckpointError(PtqbenchError):
    """A checkpoint file that cannot be trusted or read."""


MANIFEST_VERSION = 2  # state.json with the run key and each block's files (version 1 had neither)


@dataclass
class EngineState:
    next_start: int
    fp_x: torch.Tensor | None  # None: a run without calibration data has no activations
    q_x: torch.Tensor | None
    stats: list[dict]
    state: dict[str, torch.Tensor]
    rng: torch.Tensor


class Checkpoint:
    """The engine's checkpoint in ``<work>/engine`` (block structures next to the blocks in ``blocks_dir``).

    ``key`` is the run's key: a manifest of another run (a copied or reused folder) is never resumed.
    """

    def __init__(self, folder: Path, blocks_dir: Path, key: str | None = None) -> None:
        self.folder = Path(folder)
        self.blocks_dir = Path(blocks_dir)
        self.key = key
        self.blocks: dict[int, dict] = {}  # block index -> its files' sizes and digests (the manifest's "blocks")
        self.folder.mkdir(parents=True, exist_ok=True)

    def block_file(self, index: int) -> Path:
        return self.blocks_dir / f"block_{index:04d}.safetensors"

    def structure_file(self, index: int) -> Path:
        return self.blocks_dir / f"block_{index:04d}.structure.pt"

    def save_structure(self, index: int, layer: nn.Module) -> None:
        """The block's modules with every tensor on meta (call after the block was released)."""
        path = self.structure_file(index)
        tmp = path.with_suffix(".tmp")
        torch.save(layer, tmp)
        tmp.replace(path)

    def load_structure(self, index: int) -> nn.Module:
        path = self.structure_file(index)
        classes = [_trusted_class(name, path) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
        with torch.serialization.safe_globals(classes):
            return torch.load(path, map_location="meta", weights_only=True)

    def save(self, s: EngineState, finished: range = range(0)) -> int:
        """Write the state for continuing at ``s.next_start`` (blocks ``finished`` were just written); return its size in bytes."""
        from safetensors.torch import save_file

        for index in finished:  # digests of what was just written, so a resume can tell a damaged file
            self.blocks[index] = {"block": _describe(self.block_file(index), header=True),
                                  "structure": _describe(self.structure_file(index), header=False)}
        name = f"state_{s.next_start:04d}.safetensors"
        buffers = {name: t for name, t in (("fp_x", s.fp_x), ("q_x", s.q_x)) if t is not None}
        tensors = {**buffers, "rng": s.rng, **{f"state.{k}": v for k, v in s.state.items()}}
        tmp = self.folder / (name + ".tmp")
        save_file(_unshared(tensors), tmp)
        tmp.replace(self.folder / name)
        manifest = {"version": MANIFEST_VERSION, "key": self.key, "next_start": s.next_start, "file": name,
                    "state": _describe(self.folder / name, header=True), "stats": s.stats,
                    "blocks": {str(i): self.blocks[i] for i in range(s.next_start) if i in self.blocks},
                    # float sums depend on it: a resume with another count is said in the log
                    "torch_threads": torch.get_num_threads()}
        meta = self.folder / "state.json.tmp"
        meta.write_text(json.dumps(manifest, default=str))
        meta.replace(self.folder / "state.json")
        for old in self.folder.glob("state_*.safetensors"):
            if old.name != name:
                old.unlink()
        size = sum(f.stat().st_size for f in self.folder.glob("*")) + sum(f.stat().st_size for f in self.blocks_dir.glob("*"))
        log.info("checkpoint before block %d: %.1f MB in %s", s.next_start, size / 2**20, self.folder.parent)
        return size

    def load(self) -> EngineState | None:
        """The last complete state, or None when the run has none or its checkpoint fails a check (logged)."""
        from safetensors.torch import load_file

        if not (self.folder / "state.json").exists():
            return None
        info, problem = self._checked()
        if problem is not None:
            log.warning("checkpoint in %s not used: %s; the run starts from block 0 (only the last group's state is kept)",
                        self.folder.parent, problem)
            self.discard()
            return None
        self.blocks = {int(i): entry for i, entry in info["blocks"].items()}
        tensors = load_file(self.folder / info["file"])
        state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        threads = info.get("torch_threads")
        if threads is not None and threads != torch.get_num_threads():
            log.warning("the checkpoint's blocks ran with %d torch threads, the rest runs with %d: float sums differ in "
                        "order, so the result can differ from an uninterrupted run at either count", threads,
                        torch.get_num_threads())
        return EngineState(info["next_start"], tensors.get("fp_x"), tensors.get("q_x"), info["stats"], state, tensors["rng"])

    def problem(self) -> str | None:
        """Why the manifest cannot be resumed from (one line naming the file), or None when every check passes."""
        return self._checked()[1]

    def _checked(self) -> tuple[dict, str | None]:
        """The manifest, read once, and why it cannot be resumed from (None when every check passes)."""
        info: dict = {}
        try:
            info = json.loads((self.folder / "state.json").read_text())
            if info.get("version", 1) != MANIFEST_VERSION:
                return info, f"state.json is manifest version {info.get('version', 1)}, this ptqbench reads {MANIFEST_VERSION}"
            if info["key"] != self.key:
                return info, f"state.json belongs to run {info['key']}, not {self.key}"
            if (why := _mismatch(self.folder / info["file"], info["state"], header=True)) is not None:
                return info, why
            for index in range(info["next_start"]):
                entry = info["blocks"].get(str(index))
                if entry is None:
                    return info, f"block {index}: not in state.json"
                for path, recorded, header in ((self.block_file(index), entry["block"], True),
                                               (self.structure_file(index), entry["structure"], False)):
                    if (why := _mismatch(path, recorded, header)) is not None:
                        return info, f"block {index}: {why}"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return info, f"state.json is unreadable ({err.__class__.__name__}: {err})"
        return info, None

    def discard(self) -> None:
        """Forget the checkpoint: the manifest and state files go (the caller forgets the blocks)."""
        (self.folder / "state.json").unlink(missing_ok=True)
        for old in self.folder.glob("state_*.safetensors*"):
            old.unlink(missing_ok=True)
        self.blocks = {}


def _describe(path: Path, header: bool) -> dict:
    """A file's size and digest: of its safetensors header (cheap for any size), or of the whole (small) file."""
    data = safetensors_header(path) if header else path.read_bytes()
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(data).hexdigest()}


def _mismatch(path: Path, recorded: dict, header: bool) -> str | None:
    """How ``path`` differs from what the manifest recorded for it, or None."""
    if not path.is_file():
        return f"{path.parent.name}/{path.name} is missing"
    if path.stat().st_size != recorded["bytes"]:
        return f"{path.parent.name}/{path.name} has {path.stat().st_size} bytes, the manifest recorded {recorded['bytes']}"
    try:
        digest = _describe(path, header)["sha256"]
    except ResourceUnavailableError as err:
        return str(err)
    if digest != recorded["sha256"]:
        return f"{path.parent.name}/{path.name} differs from the file the manifest recorded ({'header' if header else 'content'} digest)"
    return None


def _trusted_class(name: str, path: Path) -> type:
    """The class ``name`` (``package.module.Class``) when it comes from a package ptqbench already runs."""
    from harness.registry import REGISTRY

    module, _, attr = name.rpartition(".")
    trusted = {"torch", "transformers", "harness"} | REGISTRY.packages()
    if module.split(".")[0] not in trusted:
        raise CheckpointError(f"{path}: names {name}, which is not from torch, transformers, harness or a registered "
                              f"method's package ({', '.join(sorted(trusted))}); delete the run's work directory to start over")
    obj = getattr(importlib.import_module(module), attr, None)
    if not isinstance(obj, type):
        raise CheckpointError(f"{path}: names {name}, which is not a class; delete the run's work directory to start over")
    return obj


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU contiguous tensors for safetensors, which refuses two names on one storage: a method's state
    may alias an engine buffer (QLLM keeps the last targets), so such a tensor is copied."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out
