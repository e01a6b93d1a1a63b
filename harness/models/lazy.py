"""Out-of-core models: a skeleton on the meta device whose decoder blocks are loaded when needed.

A 70B model does not fit in host RAM, so ``load_model(..., lazy=True)`` builds the model from its
``config.json`` with no weights (accelerate's ``init_empty_weights``), loads the embedding, the
final norm and the head eagerly, and attaches a :class:`BlockStore` to the model. Whoever walks the
blocks (the block-wise engine, :func:`map_blocks`, block-wise perplexity) asks the store for one
block at a time:

- ``store.load(i, layer)`` fills block ``i`` from the work directory when a finished (quantized)
  version is there, else from the model's safetensors shards (``safe_open`` reads only that
  block's tensors, through ``model.safetensors.index.json`` when the model is sharded);
- ``store.finish(i, layer)`` writes the finished block to ``<work>/block_<i>.safetensors``;
- ``store.release(layer)`` moves its tensors back to the meta device, freeing them.

The module *structure* of a finished block (``QuantLinear``s, QLLM's reassembly wrappers) stays in
memory on the meta device; only tensors go to disk. So host memory holds the skeleton, the eager
modules, one block group and the activations, whatever the depth.

Eager models (no store attached) go through the same calls, which then do nothing::

    for i, layer in materialized_blocks(model):   # loads block i, yields it, releases it
        ...
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from harness.runtime import release_freed_memory

log = logging.getLogger(__name__)

STORE_ATTR = "ptqbench_blocks"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a Hugging Face safetensors folder (sharded or not)."""
    index = folder / INDEX_FILE
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / SINGLE_FILE
    if single.exists():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    raise FileNotFoundError(f"{folder}: no {INDEX_FILE} or {SINGLE_FILE} (lazy loading needs safetensors weights)")


def read_tensors(folder: Path, names: list[str], files: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read ``names`` from their shards (each shard opened once), cast to ``dtype``."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        with safe_open(folder / file, framework="pt") as f:
            for key in keys:
                t = f.get_tensor(key)
                out[key] = t.to(dtype) if t.is_floating_point() else t
    return out


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (qualified names of params and buffers) into ``module``, replacing meta ones.

    Shapes may differ from the skeleton's (QLLM widens linears), so this assigns instead of copying.
    """
    for name, tensor in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr in owner._parameters:
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
        elif attr in owner._buffers:
            owner._buffers[attr] = tensor
        else:
            raise KeyError(f"{name}: not a parameter or buffer of the block")


def block_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a block (non-persistent buffers included), contiguous, on CPU."""
    named = {**dict(layer.named_parameters(remove_duplicate=False)), **dict(layer.named_buffers(remove_duplicate=False))}
    return {k: v.detach().to("cpu").contiguous() for k, v in named.items()}


class BlockStore:
    """Where a lazy model's decoder blocks live: the source shards, and the finished blocks."""

    def __init__(self, folder: Path, dtype: torch.dtype, layers_path: str = "model.layers") -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.layers_path = layers_path
        self.files = weight_map(self.folder)
        self.work: Path | None = None  # set by the run (execute) or lazily to a temporary folder
        self.run_key: str | None = None  # the run whose blocks ``work`` holds (its checkpoint manifest names it)
        self.finished: set[int] = set()

    def set_work_dir(self, work: Path, key: str | None = None) -> None:
        self.work = Path(work)
        self.run_key = key
        self.work.mkdir(parents=True, exist_ok=True)
        self.finished = {int(p.stem.split("_")[1]) for p in self.work.glob("block_*.safetensors")}

    def forget_from(self, first: int) -> None:
        """Treat blocks ``first...`` as not finished (a checkpoint says the run continues there)."""
        for index in sorted(i for i in self.finished if i >= first):
            self._work_file(index).unlink(missing_ok=True)
            self.finished.discard(index)

    def _work_file(self, index: int) -> Path:
        if self.work is None:
            import tempfile

            self.set_work_dir(Path(tempfile.mkdtemp(prefix="ptqbench-blocks-")))
        return self.work / f"block_{index:04d}.safetensors"

    def source_names(self, prefix: str) -> list[str]:
        return [name for name in self.files if name.startswith(prefix)]

    def load(self, index: int, layer: nn.Module) -> None:
        """Fill block ``index`` on CPU: its finished version if written, else the source weights."""
        if index in self.finished:
            from safetensors.torch import load_file

            assign_tensors(layer, load_file(self._work_file(index)))
            return
        from harness.adapter import prepared_state

        prefix = f"{self.layers_path}.{index}."
        tensors = read_tensors(self.folder, self.source_names(prefix), self.files, self.dtype)
        # the checkpoint's layout into the prepared block's (a fused linear's parts, stacked experts)
        assign_tensors(layer, prepared_state(layer, {name[len(prefix):]: t for name, t in tensors.items()}))

    def finish(self, index: int, layer: nn.Module) -> int:
        """Write the finished block (atomically: tmp file + rename); return its size in bytes."""
        from safetensors.torch import save_file

        path = self._work_file(index)
        tmp = path.with_suffix(".tmp")
        save_file(block_tensors(layer), tmp)
        tmp.replace(path)
        self.finished.add(index)
        return path.stat().st_size

    @staticmethod
    def release(layer: nn.Module) -> None:
        """Drop the block's tensors (back to the meta device; the module structure stays).

        The collection matters: safetensors maps each shard whole and the mapping lives until its
        Python owner is collected, so without it the pages of every block read so far stay in the
        process's RSS (measured: peak RSS grew by one fp16 block per block, 4.2 GB at 32 layers).
        """
        layer.to("meta")
        release_freed_memory()


def block_store(model: nn.Module) -> BlockStore | None:
    """The model's store when it was loaded lazily, else None."""
    return getattr(model, STORE_ATTR, None)


def is_lazy(model: nn.Module) -> bool:
    return block_store(model) is not None


@contextlib.contextmanager
def materialized(model: nn.Module, start: int, layers: list[nn.Module], finish: bool = False) -> Iterator[list[nn.Module]]:
    """Blocks ``start...`` loaded on CPU for the ``with`` body; written (``finish``) and released after.

    Without a store (an eager model) the blocks are simply yielded. When the body raises, nothing is
    written: a half-processed block must never look finished.
    """
    store = block_store(model)
    if store is None:
        yield layers
        return
    for offset, layer in enumerate(layers):
        store.load(start + offset, layer)
    yield layers
    for offset, layer in enumerate(layers):
        if finish:
            size = store.finish(start + offset, layer)
            log.debug("block %d written (%.1f MB)", start + offset, size / 2**20)
        store.release(layer)


def matches_source(store: BlockStore, name: str, tensor: torch.Tensor, rows_per_read: int = 4096) -> bool:
    """Whether ``tensor`` still equals source tensor ``name`` (cast to the store's dtype), read in row slices.

    Slices keep the check's extra memory small (4096 x 2048 floats, not a second embedding).
    """
    from safetensors import safe_open

    with safe_open(store.folder / store.files[name], framework="pt") as f:
        source = f.get_slice(name)
        if list(source.get_shape()) != list(tensor.shape):
            return False
        for start in range(0, tensor.shape[0], rows_per_read):
            chunk = source[start : start + rows_per_read].to(device=tensor.device, dtype=tensor.dtype)
            if not torch.equal(chunk, tensor[start : start + rows_per_read]):
                return False
    return True


@contextlib.contextmanager
def embedding_and_head_offloaded(model: nn.Module) -> Iterator[None]:
    """A lazy model's input embedding and ``lm_head`` weight released for the ``with`` body, read again after.

    The block-wise engine needs the embedding once, to embed the calibration tokens, and evaluation
    needs both again; in between they are the largest tensors in host memory that no block uses (a
    float32 49152 x 2048 embedding is 0.4 GB, an eighth of the scale benchmark's model on disk;
    LLaMA-2-70B's untied 32000 x 8192 head is 1 GB more). Reading them back from their source shards
    gives the same tensors; a head tied to the embedding is tied again. Only a weight that still
    equals its source is released: one a method changed before the blocks (a rotation folded into
    the embedding, say) exists nowhere else, so it stays. Eager models are left alone.
    """
    from harness.adapter import get_adapter

    store = block_store(model)
    if store is None:
        yield
        return
    adapter = get_adapter(model)
    embed, head = adapter.embed(model), adapter.lm_head(model)
    tied = head.weight is embed.weight
    names = {id(m): f"{n}.weight" for n, m in model.named_modules()}
    released = {names[id(m)]: (m, m.weight.dtype, m.weight.device) for m in ([embed] if tied else [embed, head])
                if names[id(m)] in store.files and not m.weight.is_meta
                and matches_source(store, names[id(m)], m.weight.detach())}
    for module, _, _ in released.values():
        # a new (meta) Parameter: a tied head must drop its reference to the old one too
        module.weight = nn.Parameter(module.weight.detach().to("meta"), requires_grad=module.weight.requires_grad)
    if tied and released:
        head.weight = embed.weight
    release_freed_memory()
    try:
        yield
    finally:
        for name, (_, dtype, device) in released.items():  # the dtype it had, so the tensor is the same
            assign_tensors(model, {name: read_tensors(store.folder, [name], store.files, dtype)[name].to(device)})
        if tied and released:
            head.weight = embed.weight


def map_blocks(model: nn.Module, fn: Callable[[int, nn.Module], None]) -> None:
    """Apply ``fn(index, block)`` to every decoder block in order, one block in memory at a time.

    ``fn`` changes the block in place (RTN swaps its linears); on a lazy model the result is the
    block's finished version. Unlike the block-wise engine this keeps no checkpoint.
    """
    from harness.adapter import get_adapter

    store = block_store(model)
    if store is not None:
        store.forget_from(0)  # no checkpoint here (a pass is cheap): blocks of an earlier attempt are redone
    for i, layer in enumerate(get_adapter(model).layers(model)):
        with materialized(model, i, [layer], finish=True):
            fn(i, layer)


def materialize_all(model: nn.Module, device_map: dict[str, str | int] | None = None) -> nn.Module:
    """Load every block and detach the store (for code that needs the whole model, like lm-eval).

    ``device_map`` (module name -> device, as accelerate's ``infer_auto_device_map`` gives) puts each
    block straight onto its device as it is loaded, so host memory never holds the blocks that go
    to a GPU; without it everything lands in host memory.
    """
    from harness.adapter import get_adapter

    store = block_store(model)
    if store is not None:
        adapter = get_adapter(model)
        for i, layer in enumerate(adapter.layers(model)):
            store.load(i, layer)
            target = _mapped_device(device_map, f"{adapter.layers_path}.{i}")
            if target is not None:
                layer.to(target)
        delattr(model, STORE_ATTR)
    return model


def _mapped_device(device_map: dict[str, str | int] | None, name: str) -> str | int | None:
    """The device ``device_map`` gives module ``name`` (its own entry or its closest parent's)."""
    if not device_map:
        return None
    while True:
        if name in device_map:
            return device_map[name]
        if "." not in name:
            return device_map.get("")
        name = name.rpartition(".")[0]


def dispatch(model: nn.Module, device: torch.device, max_memory: dict[int | str, int] | None = None) -> nn.Module:
    """The whole model ready for lm-eval: on CPU in host memory; on CUDA spread over the GPUs and host
    memory by accelerate (``infer_auto_device_map`` with ``max_memory``, whole decoder blocks per device,
    hooks moving activations between them), so a 70B model evaluates on 2 GPUs or one GPU plus host."""
    if device.type != "cuda":
        return materialize_all(model).to(device)
    from accelerate import dispatch_model, infer_auto_device_map

    from harness.adapter import get_adapter

    block_class = type(get_adapter(model).layers(model)[0]).__name__
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=[block_class])
    if any(d == "disk" for d in device_map.values()):
        from harness.errors import ResourceUnavailableError

        raise ResourceUnavailableError("zeroshot: the model does not fit in GPU plus host memory (max_memory)")
    materialize_all(model, device_map)
    return dispatch_model(model, device_map=device_map)
