"""Writing an export folder (``harness.export.formats`` describes both formats): ``export_model`` picks
compressed-tensors when the model fits it, else ptqbench's format, and stages the folder so a failure
leaves nothing half-written."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.adapter import PREPARED_MODULES, checkpoint_state
from harness.atomic import current_umask
from harness.bits import BitSpec
from harness.errors import ResourceUnavailableError
from harness.export.formats import (
    CT_INT,
    CT_PACKED,
    DENSE,
    FORMAT_VERSION,
    INFO,
    MANIFEST,
    PTQBENCH,
    TRANSFORMERS_DEQUANTIZE,
    ExportError,
    ExportResult,
    folder_size,
    human_size,
)
from harness.quant import attention
from harness.quant.online import OnlineTransform
from harness.quant.qlinear import QuantLinear, freeze, quant_linears, set_act_clip
from harness.quant.reassembly import Reassembled, Reassembly

log = logging.getLogger(__name__)


def export_model(model: nn.Module, tokenizer: Any, out: str | Path, *, source: dict[str, Any] | None = None,
                 overwrite: bool = False) -> ExportResult:
    """Write ``model`` (frozen first) to ``out`` in compressed-tensors format when it can, else ptqbench's.

    The folder is written beside ``out`` and renamed into place, so a failed export leaves nothing
    half-written; an existing non-empty ``out`` is refused unless ``overwrite``.
    """
    out = check_target(out, overwrite)
    freeze(model)
    linears = dict(quant_linears(model))
    blocker = compressed_tensors_blocker(model, linears) if linears else None
    with staged(out) as tmp:
        if not linears:
            fmt = DENSE
            _save_dense(model, checkpoint_state(model, _state_dict(model)), tmp)  # fused projections fused back
        elif blocker is None:
            fmt = _write_compressed_tensors(model, linears, tmp)
        else:
            fmt = PTQBENCH
            _write_ptqbench(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        size = folder_size(tmp)
        info = {"format": fmt, "size_bytes": size, "reason": blocker or "", "source": source or {},
                "attention_kernel": attention.kernel_of(getattr(model, "config", None))}
        if fmt in (CT_PACKED, CT_INT):  # the whole spec (clip ratio, grid): what load_quantized quantizes activations with
            info["spec"] = next(iter(linears.values())).spec.to_dict()
        (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    size = folder_size(out)
    log.info("exported %s (%s, %s)%s", out, fmt, human_size(size), f"; ptqbench format because {blocker}" if blocker else "")
    return ExportResult(out, fmt, size, blocker or "")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` for the body to fill: renamed into place (replacing ``out``) when the
    body returns, deleted when it raises, so ``out`` is never half-written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        mask = current_umask()
        for path in [tmp, *tmp.rglob("*")]:  # ordinary permissions: mkdtemp makes 0700, safetensors 0.8 writes 0600
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_target(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path; an existing non-empty folder is refused unless ``overwrite`` (never lose an earlier export)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"--out: {out} exists and is not empty; choose another folder or overwrite it (--force)")
    return out


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors, each once (a tied ``lm_head`` is the embedding), contiguous for safetensors."""
    seen: set[int] = set()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # a tied weight: from_pretrained / load_quantized tie it again from config.json
        seen.add(key)
        state[name] = tensor.detach().cpu().contiguous()
    return state


def _save_config(model: nn.Module, out: Path, quantization_config: dict | None = None) -> None:
    config = copy.deepcopy(model.config)
    config.dtype = next(model.parameters()).dtype
    if quantization_config is not None:
        config.quantization_config = quantization_config
    config.save_pretrained(out)


def _save_dense(model: nn.Module, state: dict[str, torch.Tensor], out: Path, quantization_config: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _save_config(model, out, quantization_config)


def compressed_tensors_blocker(model: nn.Module, linears: dict[str, QuantLinear]) -> str | None:
    """Why ``model`` cannot be written in compressed-tensors format (None: it can)."""
    prepared = next((n for n, m in model.named_modules() if isinstance(m, PREPARED_MODULES)), None)
    if prepared is not None:  # transformers' own module there holds one fused or stacked tensor, not these linears
        return f"{prepared} holds separate linears where the {model.config.model_type} checkpoint fuses or stacks them"
    if any(isinstance(m, Reassembled) for m in model.modules()):
        return "it has channel reassembly (QLLM) in front of its linears"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "bias", None) is not None:
        return "its lm_head has a bias (QLLM's final-norm bias), which LLaMA's config cannot declare"
    rotated = [n for n, q in linears.items() if getattr(q, "input_transform", None) is not None]
    if rotated:
        return f"{rotated[0]} has an online transform of its input (a rotation's Hadamard)"
    plain = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if plain:
        return f"linear {plain[0]} is not quantized while others are"
    specs = {q.spec for q in linears.values()}
    if len(specs) > 1:
        return f"its linears use {len(specs)} different bit specs"
    spec = specs.pop()
    if not 2 <= spec.w_bits <= 8:
        return f"{spec.name}: compressed-tensors integer weights need 2..8 bits"
    if spec.a_bits not in (8, 16):
        return f"{spec.name}: {spec.a_bits}-bit activations (compressed-tensors models serve int8 or unquantized activations)"
    if spec.w_granularity == "tensor":
        return "per-tensor weights (exported per channel or per group only)"
    # compressed-tensors declares activations of linears only; ptqbench's Q/K/V ranges are dynamic per token and head
    # (with clip ratios and QuaRot's Hadamard on Q and K), which a loader of that format would not compute alike
    attn = next((n for n, m in model.named_modules() if getattr(m, attention.ATTRIBUTE, None) is not None), None)
    if attn is not None:
        return f"{attn} quantizes its attention inputs (Q/K/V or the KV cache, per token and head)"
    projected = [n for n, q in linears.items() if getattr(q, "out_quant", None) is not None]
    if projected:
        return f"{projected[0]} quantizes its output (attention_scope: projection)"
    missing = [n for n, q in linears.items() if not hasattr(q, "weight_scale")]
    if missing:
        return f"{missing[0]} froze without recording its scale (its weight quantizer has no quant_params)"
    return None


def _ct_scheme(spec: BitSpec, targets: list[str], fmt: str) -> Any:
    """The compressed-tensors scheme of ``spec``: asymmetric W4A16g128 gives compressed-tensors' W4A16_ASYM preset
    (llm-compressor's) but for ``format``, which the presets leave to be inferred and ptqbench declares."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=spec.w_bits, type="int", symmetric=spec.w_symmetric,
                               strategy="group" if spec.w_group else "channel", group_size=spec.w_group or None)
    acts = None
    if spec.quantizes_activations:  # ptqbench quantizes activations dynamically, one range per token
        acts = QuantizationArgs(num_bits=spec.a_bits, type="int", symmetric=spec.a_symmetric, strategy="token", dynamic=True)
    # The format is declared in the scheme itself: without it, transformers infers pack-quantized for every
    # weight-only scheme when it loads the folder, whatever the config's top-level format says.
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts, format=fmt.split("/")[1])


def _write_compressed_tensors(model: nn.Module, linears: dict[str, QuantLinear], out: Path) -> str:
    try:
        from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        raise ResourceUnavailableError("export: this model is written in compressed-tensors format, which needs the "
                                       "'compressed-tensors' package; pip install 'ptqbench[export]'") from None

    spec = next(iter(linears.values())).spec
    # 4-bit and below is packed, as llm-compressor packs weight-only schemes. Asymmetric weights with 8-bit activations
    # stay int-quantized, as llm-compressor writes them, and must: packed asymmetric weights load in transformers only
    # dequantized (TRANSFORMERS_DEQUANTIZE), as plain nn.Linear, which would drop the int8 activation quantization.
    # (llm-compressor would also pack W5..8A16, and write symmetric W4A8 int-quantized.)
    packed = spec.w_bits <= 4 and (spec.w_symmetric or not spec.quantizes_activations)
    compressor, fmt = (PackedQuantizationCompressor, CT_PACKED) if packed else (IntQuantizationCompressor, CT_INT)
    scheme = _ct_scheme(spec, ["Linear"], fmt)
    # ptqbench's asymmetric integers are 0..2^b-1; compressed-tensors' are signed, -2^(b-1)..2^(b-1)-1
    offset = 0 if spec.w_symmetric else 2 ** (spec.w_bits - 1)
    state = _state_dict(model)
    for name, q in linears.items():
        weight = state.pop(f"{name}.weight")
        rows = weight.shape[0]
        scale = q.weight_scale.detach().cpu().to(weight.dtype).reshape(rows, -1)
        zero = (q.weight_zero.detach().cpu().reshape(rows, -1) - offset)
        lo, hi = -(2 ** (spec.w_bits - 1)), 2 ** (spec.w_bits - 1) - 1
        if zero.min() < lo or zero.max() > hi:
            raise ExportError(f"{name}: a zero point lies outside {spec.w_bits}-bit integers (a row of one sign); "
                              "export with symmetric weights (quant.weight_symmetric: true)")
        module_state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero.to(torch.int8)}
        compressed = compressor.compress(dict(module_state), scheme)
        # The promise of this format: compressed-tensors' own decompression gives back ptqbench's weight bit for bit.
        restored = compressor.decompress(dict(compressed), scheme)["weight"].to(weight.dtype)
        if not torch.equal(restored, weight):
            raise ExportError(f"{name}: the recorded scale and zero point do not reproduce the frozen weight "
                              f"(max diff {(restored - weight).abs().max().item():.3g}); was it changed after freezing?")
        state.update({f"{name}.{k}": v.contiguous() for k, v in compressed.items()})
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt.split("/")[1],
                                quantization_status="compressed", ignore=["lm_head"]).model_dump(mode="json")
    if packed and not spec.w_symmetric:  # a packed zero point: transformers loads it only dequantizing (see above)
        config[TRANSFORMERS_DEQUANTIZE] = True
    _save_dense(model, state, out, config)
    return fmt


def _write_ptqbench(model: nn.Module, out: Path) -> None:
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, Reassembled)}
    known = (QuantLinear, Reassembled, Reassembly, OnlineTransform)
    for name, module in model.named_modules():
        origin = type(module).__module__.split(".")[0]
        if not isinstance(module, known) and origin not in ("torch", "transformers", "harness"):
            raise ExportError(f"cannot export module {name} ({type(module).__name__} from {type(module).__module__}): "
                              "ptqbench's format knows QuantLinear, Reassembled, online transforms (harness.quant.online) "
                              "and the architecture's own modules")

    def plain(name: str) -> str:  # the architecture's key of a module inside a Reassembled wrapper
        for path in wrapped:
            if name.startswith(path + ".module"):
                return path + name[len(path) + len(".module"):]
        return name

    state = {plain(k): v for k, v in _state_dict(model).items()}
    head = model.get_output_embeddings()
    linears = {plain(n): _linear_entry(n, q) for n, q in quant_linears(model)}
    attentions = _attention_entries(model, plain)
    extended = any("act_clip" in e for e in linears.values()) or any(map(attention.extends_version_2, attentions.values()))
    manifest = {
        "format": PTQBENCH, "version": FORMAT_VERSION if extended else 2,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attention_kernel": attention.kernel_of(model.config),
        "linears": linears,
        "attention": attentions,
        "reassembly": {path: {"after": m.after} for path, m in wrapped.items()},
        "lm_head_bias": head is not None and head.bias is not None,
    }
    _save_dense(model, state, out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _linear_entry(name: str, q: QuantLinear) -> dict[str, Any]:
    """A linear's manifest entry: its spec (the activation quantizer, with its learned clip), its online transform,
    its output quantizer."""
    built = QuantLinear(nn.Linear(1, 1, bias=False), q.spec)  # what load_quantized builds from the spec
    act_clip = getattr(q, "act_clip", None)
    if act_clip is not None:
        set_act_clip(built, *act_clip)
    built = built.act_quant
    if (attention.quantizer_dict(q.act_quant), q.act_quant.enabled) != (attention.quantizer_dict(built), built.enabled):
        raise ExportError(f"cannot export {name}: its input quantizer was changed after it was built, so the bit spec "
                          f"{q.spec.name} does not describe it")
    entry: dict[str, Any] = {"spec": q.spec.to_dict()}
    if act_clip is not None:
        entry["act_clip"] = list(act_clip)
    if getattr(q, "input_transform", None) is not None:
        if q.input_transform.state_dict():  # the manifest holds the recipe alone (harness.quant.online)
            raise ExportError(f"cannot export {name}: its online transform holds tensors its recipe (to_dict) does not "
                              "rebuild; keep them as non-persistent buffers computed from the recipe")
        entry["input_transform"] = q.input_transform.to_dict()
    if getattr(q, "out_quant", None) is not None:
        entry["out_quant"] = attention.quantizer_dict(q.out_quant)
    return entry


def _attention_entries(model: nn.Module, plain: Any) -> dict[str, dict]:
    """Each attention module's installed Q/K/V quantizer (``attention.describe``), by module name."""
    entries = {}
    for name, module in model.named_modules():
        try:
            entry = attention.describe(module)
        except ValueError as err:
            raise ExportError(f"cannot export {name}: {err}") from None
        if entry is not None:
            entries[plain(name)] = entry
    return entries
