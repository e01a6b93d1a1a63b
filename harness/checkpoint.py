"""Block checkpoints: what the block-wise engine needs to continue a run that was killed.

After every block group of a lazy model (``harness.lazy``) the engine has on disk, under the
run's work directory:

- ``blocks/block_<i>.safetensors``: the finished blocks' tensors (written by the block store),
- ``blocks/block_<i>.structure.pt``: each finished block's module *structure* on the meta device
  (``QuantLinear``s, QLLM's wrappers; no tensors), which a fresh process cannot rebuild otherwise,
- ``engine/state_<n>.safetensors``: the next group's FP and student inputs, the method's state
  tensors (``run_blockwise(state=...)``) and the torch RNG state,
- ``engine/state.json``: the index ``n`` of the next group and the finished jobs' stats (as the
  result JSON will hold them: ``default=str``); written
  last (tmp file + rename), so it always names a complete state file.

A run started again finds ``state.json``, restores the buffers, the RNG, the stats and the
finished blocks' structure, and continues with group ``n``: its result equals an uninterrupted
run's bit for bit (same seed, same device). Structure files are pickles, read back with torch's
restricted unpickler (``weights_only=True``) that admits only the classes the file names from
torch, transformers, harness and the packages of registered methods (a plugin method's own module
classes included); a file naming anything else is refused with the class it names.

Test hook: ``PTQBENCH_TEST_KILL_AT=block:N`` makes the engine SIGKILL its own process right after
the checkpoint of the group starting at block N, ``mid:N`` in the middle of that group (after
the method processed it, before anything of it is written): the durability tests kill real runs
with it. ``PTQBENCH_TEST_KILL_SIGNAL=SIGUSR2`` sends that signal instead, the one Slurm (through
submitit) uses to preempt a job or warn it of its time limit: the requeue test preempts a real run.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from harness.errors import PtqbenchError

log = logging.getLogger(__name__)


class CheckpointError(PtqbenchError):
    """A checkpoint file that cannot be trusted or read."""


KILL_ENV = "PTQBENCH_TEST_KILL_AT"
KILL_SIGNAL_ENV = "PTQBENCH_TEST_KILL_SIGNAL"


@dataclass
class EngineState:
    next_start: int
    fp_x: torch.Tensor
    q_x: torch.Tensor
    stats: list[dict]
    state: dict[str, torch.Tensor]
    rng: torch.Tensor


class Checkpoint:
    """The engine's checkpoint in ``<work>/engine`` (block structures next to the blocks in ``blocks_dir``)."""

    def __init__(self, folder: Path, blocks_dir: Path) -> None:
        self.folder = Path(folder)
        self.blocks_dir = Path(blocks_dir)
        self.folder.mkdir(parents=True, exist_ok=True)

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

    def save(self, s: EngineState) -> int:
        """Write the state for continuing at ``s.next_start``; return the checkpoint's size in bytes."""
        from safetensors.torch import save_file

        name = f"state_{s.next_start:04d}.safetensors"
        tensors = {"fp_x": s.fp_x, "q_x": s.q_x, "rng": s.rng, **{f"state.{k}": v for k, v in s.state.items()}}
        tmp = self.folder / (name + ".tmp")
        save_file(_unshared(tensors), tmp)
        tmp.replace(self.folder / name)
        meta = self.folder / "state.json.tmp"
        meta.write_text(json.dumps({"next_start": s.next_start, "file": name, "stats": s.stats}, default=str))
        meta.replace(self.folder / "state.json")
        for old in self.folder.glob("state_*.safetensors"):
            if old.name != name:
                old.unlink()
        size = sum(f.stat().st_size for f in self.folder.glob("*")) + sum(f.stat().st_size for f in self.blocks_dir.glob("*"))
        log.info("checkpoint before block %d: %.1f MB in %s", s.next_start, size / 2**20, self.folder.parent)
        return size

    def load(self) -> EngineState | None:
        """The last complete state, or None when the run has none."""
        from safetensors.torch import load_file

        meta = self.folder / "state.json"
        if not meta.exists():
            return None
        info = json.loads(meta.read_text())
        tensors = load_file(self.folder / info["file"])
        state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        return EngineState(info["next_start"], tensors["fp_x"], tensors["q_x"], info["stats"], state, tensors["rng"])


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


def kill_point(where: str, start: int) -> None:
    """The test hook: SIGKILL (or ``PTQBENCH_TEST_KILL_SIGNAL``) this process when ``PTQBENCH_TEST_KILL_AT`` names this point."""
    if os.environ.get(KILL_ENV) == f"{where}:{start}":
        sig = signal.Signals[os.environ.get(KILL_SIGNAL_ENV, "SIGKILL")]
        log.warning("%s=%s: sending %s to this process", KILL_ENV, os.environ[KILL_ENV], sig.name)
        os.kill(os.getpid(), sig)
