"""Quantized models that leave ptqbench: write a Hugging Face folder, and load one back.

    export_model(model, tokenizer, "out/w4a16")     # -> ExportResult(path, format, size_bytes, reason)
    model = load_quantized("out/w4a4")              # any folder this module wrote

Two formats; the model decides which:

- **compressed-tensors** (what llm-compressor writes and transformers / vLLM load) when every
  quantized linear shares one bit spec with weights of 2..8 bits per output channel or per group,
  activations unquantized or 8-bit (declared as dynamic per-token int8, symmetric or not, as ptqbench
  computes them), and nothing else is changed structurally. Weights are stored as integers, 4-bit and
  below packed into int32s (``pack-quantized``; asymmetric ones only in weight-only specs), the rest one
  per int8 (``int-quantized``), with the scale and zero point each ``QuantLinear`` recorded when it froze,
  so the checkpoint dequantizes to exactly ptqbench's fake-quantized weights (checked with
  compressed-tensors' own decompressor before writing). Up to 4 weight bits without activation
  quantization, and with int8 activations for asymmetric or 8-bit weights, the tensors and config are
  the ones llm-compressor writes; packed asymmetric folders add ``"dequantize": true`` for transformers
  (see ``TRANSFORMERS_DEQUANTIZE``). ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads
  it, no ptqbench needed; ``load_quantized`` reads it back as ptqbench's quantized model (the bit spec is
  recorded in ``ptqbench_export.json``), whose activations ptqbench's code quantizes, as in the run.
  Quantized attention inputs, q/k/v outputs or online transforms send a model to ptqbench's format: the
  compressed-tensors config declares the linears' quantization only.
- **ptqbench** for what that format cannot say: activations below 8 bits (W4A4, W6A6), quantized attention
  inputs (Q/K/V per token and head, the KV cache, QuaRot's Hadamard on Q and K; ``harness.quant.attention``)
  and q/k/v outputs (``attention_scope: projection``), online transforms of a linear's input (a rotation's
  Hadamard), QLLM's channel reassembly (index/scale modules between a norm and its linears), an ``lm_head``
  bias (QLLM's final norm bias folded into the head), per-tensor weights, the separate linears of a family whose
  checkpoint fuses or stacks them (Phi-3's q/k/v, Qwen3-MoE's experts: ``harness.adapter.fused``). Everything that folds is folded
  into plain weights: ``model.safetensors`` holds the architecture's own keys with the fake-quantized
  weights (a reassembled linear's weight with its reassembled width) plus ``<module>.reassembly.{src,scale,
  group,count}`` buffers, and ``ptqbench_quant.json`` says what to rebuild::

      {"format": "ptqbench", "version": 3, "dtype": "float32", "attention_kernel": "sdpa",
       "linears": {"model.layers.0.self_attn.o_proj": {"spec": {BitSpec.to_dict()},          # act quantizer
                                                       "act_clip": [0.9, 0.8],               # learned clip (v3)
                                                       "input_transform": {"kind": ...},     # online transform
                                                       "out_quant": {"bits": 4, ...}}, ...}, # q/k/v, projection
       "attention": {"model.layers.0.self_attn": {"spec": {...}, "rotate_qk": true,         # Q/K/V quantizers
                                                  "clips": {"k": [0.9, 0.8]},              # learned clips (v3)
                                                  "k_transform": {"kind": ...}}, ...},      # Q/K transforms (v3)
       "reassembly": {"model.layers.0.input_layernorm": {"after": true}, ...},              # Reassembled wrappers
       "lm_head_bias": true}

  ``load_quantized`` builds the architecture from ``config.json`` with the attention kernel the model
  computed with and puts those modules back; its logits equal the exported model's, so a run's kept or
  exported model evaluates to the run's perplexity.

Every folder also gets the tokenizer and ``ptqbench_export.json`` (format, size, attention kernel, why
ptqbench's format was needed, and the run it came from when known). Unquantized models are written as
plain HF folders, in the family's checkpoint layout (Phi-3's projections fused back).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.adapter import PREPARED_MODULES, SUPPORTED_MODEL_TYPES, checkpoint_state, get_adapter
from harness.bits import BitSpec
from harness.errors import PtqbenchError, ResourceUnavailableError
from harness.quant import attention
from harness.quant.qlinear import QuantLinear, freeze, quant_linears, set_act_clip
from harness.quant.quantizer import ActQuantizer
from harness.quant.reassembly import Reassembled, Reassembly
from harness.quant.online import OnlineTransform, online_transform
from harness.atomic import current_umask

log = logging.getLogger(__name__)

MANIFEST = "ptqbench_quant.json"
INFO = "ptqbench_export.json"
# 2: the attention quantizers, q/k/v output quantizers and attention kernel. A version-1 folder holds none of them, so
# it loads, but a model whose run quantized Q/K/V loads without those quantizers (load_quantized warns).
# 3: learned activation clips (a linear's "act_clip", an attention's "clips") and transforms of Q and K after RoPE
# ("q_transform", "k_transform"), which a version-2 reader would drop; a folder without them is written as version 2.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CT_PACKED, CT_INT, PTQBENCH, DENSE = "compressed-tensors/pack-quantized", "compressed-tensors/int-quantized", "ptqbench", "dense"
_BUFFERS = ("src", "scale", "group", "count")

# A transformers loading key in the quantization_config of packed asymmetric weight-only folders; compressed-tensors'
# QuantizationConfig ignores extra keys and vLLM does not read it (it serves the packed tensors). The checkpoint itself
# is what llm-compressor writes: compressed-tensors 0.20 packs a channel/group zero point into int32s
# (compressed_tensors/compressors/pack_quantized/base.py:103-106, PACK_ZP_STRATS :29-32). transformers 5.23 without
# the key builds each layer on the meta device and calls compress_model (quantizers/quantizer_compressed_tensors.py
# :115-119), whose meta path (pack_quantized/base.py:83-91) never packs the zero point, so it expects a (rows, groups)
# int8 tensor, finds the packed one and stops (core_model_loading.py:1455-1461 -> utils/loading_report.py:315-318).
# With the key it keeps the model dense (quantizer_compressed_tensors.py:92-94) and decompresses the real tensors as
# it reads them (integrations/compressed_tensors.py:86-93): the same weights, but dense in memory from the start (a
# compressed load decompresses on its first forward anyway) and a model without quantization_config. Drop the key
# once transformers packs the zero point on that path (compressed-tensors 0.20.1 is unchanged).
TRANSFORMERS_DEQUANTIZE = "dequantize"


class ExportError(PtqbenchError):
    """A model or folder that cannot be exported or loaded back."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    size_bytes: int
    reason: str = ""  # why the ptqbench format was needed ("" otherwise)


def folder_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def human_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# ---------------------------------------------------------------------------------------------- writing

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


# ---------------------------------------------------------------------------------------------- loading

def is_ptqbench_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_quantized_export(path: str | Path) -> bool:
    """Whether ``load_quantized`` rebuilds ``path`` as ptqbench's quantized model: a folder ``export_model`` wrote in
    ptqbench's format, or in compressed-tensors format with its bit spec recorded."""
    return is_ptqbench_folder(path) or _compressed_tensors_spec(path) is not None


def _compressed_tensors_spec(path: str | Path) -> BitSpec | None:
    info = export_info(path)
    return BitSpec.from_dict(info["spec"]) if info.get("format") in (CT_PACKED, CT_INT) and "spec" in info else None


def export_info(path: str | Path) -> dict[str, Any]:
    """``ptqbench_export.json`` of an exported folder ({} for any other folder or model name)."""
    info = Path(path) / INFO
    return json.loads(info.read_text()) if info.is_file() else {}


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, _, attr = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    current = getattr(module, attr, None)
    if isinstance(current, torch.Tensor) and current.shape == value.shape:
        with torch.no_grad():
            current.copy_(value)  # in place, so weights tied to this one stay tied
        return
    if attr in module._buffers:
        module._buffers[attr] = value
        return
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)  # a new shape (reassembled width) or a new bias
    if isinstance(module, nn.Linear) and attr == "weight":
        module.out_features, module.in_features = value.shape


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model ``export_model`` wrote, in either format, as the quantized model it was (its logits); any other
    folder (a dense one, a compressed-tensors one written elsewhere) with ``from_pretrained``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_ptqbench_folder(path):
        if not (path / "config.json").is_file():
            raise ExportError(f"{path}: not an exported model folder (no {MANIFEST} or config.json)")
        kernel, spec = export_info(path).get("attention_kernel"), _compressed_tensors_spec(path)
        if spec is not None:
            return _load_compressed_tensors(path, spec, kernel).to(device).eval()
        # a dense folder, or a compressed-tensors one from elsewhere: transformers' own loader
        model = AutoModelForCausalLM.from_pretrained(path, **_kernel_kwargs(kernel))
        return _prepared(model).to(device).eval()
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != PTQBENCH or manifest.get("version") not in READABLE_VERSIONS:
        raise ExportError(f"{path / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                          f"this ptqbench reads {PTQBENCH!r} versions {', '.join(map(str, READABLE_VERSIONS))}")
    if manifest["version"] == 1 and any(_quantizes_attention(e["spec"]) for e in manifest["linears"].values()):
        log.warning("%s: written without its attention quantizers (format version 1), which its bit spec asks for; "
                    "it evaluates to another perplexity than its run. Export the run again", path)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, manifest["dtype"]),
                                             **_kernel_kwargs(manifest.get("attention_kernel")))
    _prepared(model)  # the layout the quantized model was written in (separate linears)
    tensors = load_file(str(path / "model.safetensors"))
    buffers = {k for k in tensors if any(k == f"{p}.reassembly.{b}" for p in manifest["reassembly"] for b in _BUFFERS)}
    expected = set(model.state_dict())
    for key, value in tensors.items():
        if key not in buffers:
            if key not in expected and not key.endswith(".bias"):
                raise ExportError(f"{path}: tensor {key} has no place in a {config.model_type} model")
            _set_tensor(model, key, value)
    for name, entry in manifest["linears"].items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        qlinear = QuantLinear.frozen_from(getattr(owner, attr), BitSpec.from_dict(entry["spec"]))
        if "act_clip" in entry:
            set_act_clip(qlinear, *entry["act_clip"])
        if "input_transform" in entry:
            qlinear.input_transform = online_transform(entry["input_transform"])
        if "out_quant" in entry:
            qlinear.out_quant = ActQuantizer(**entry["out_quant"])
        setattr(owner, attr, qlinear)
    for name, entry in manifest.get("attention", {}).items():
        attention.reinstall(model.get_submodule(name), entry)
    for name, entry in manifest["reassembly"].items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        reassembly = Reassembly(*(tensors[f"{name}.reassembly.{b}"] for b in _BUFFERS))
        setattr(owner, attr, Reassembled(getattr(owner, attr), reassembly, entry["after"]))
    return model.to(device).eval()


def _load_compressed_tensors(path: Path, spec: BitSpec, kernel: str | None) -> nn.Module:
    """A compressed-tensors folder this module wrote, as ptqbench's quantized model: transformers dequantizes the
    integers (to the exported weights bit for bit: checked when they were written) and every linear but the head
    becomes a frozen ``QuantLinear`` of ``spec``, so the activations are quantized by ptqbench's code, as in the
    run (transformers' own compressed load runs compressed-tensors' int8 activation code instead, which can round
    some tokens differently)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # passing a loading option beside the folder's own config is what it warns about
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=CompressedTensorsConfig(dequantize=True),
                                                     **_kernel_kwargs(kernel))
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and module is not head:
            parent, _, attr = name.rpartition(".")
            module.weight.requires_grad_(False)
            setattr(model.get_submodule(parent), attr, QuantLinear.frozen_from(module, spec))
    return model


def _prepared(model: nn.Module) -> nn.Module:
    """``model`` in its adapter's layout (``LlamaAdapter.prepare``) when ptqbench describes its family, as loaded models are."""
    return get_adapter(model).prepare(model) if model.config.model_type in SUPPORTED_MODEL_TYPES else model


def _kernel_kwargs(kernel: str | None) -> dict[str, str]:
    """``from_pretrained`` / ``from_config`` keywords for the attention kernel an export recorded (none: the default)."""
    return {"attn_implementation": kernel} if kernel else {}


def _quantizes_attention(spec: dict) -> bool:
    spec = BitSpec.from_dict(spec)
    return spec.quantizes_attention or spec.quantizes_kv


__all__ = ["CT_INT", "CT_PACKED", "DENSE", "PTQBENCH", "TRANSFORMERS_DEQUANTIZE", "ExportError", "ExportResult", "check_target",
           "export_info", "export_model", "folder_size", "human_size", "is_ptqbench_folder", "is_quantized_export",
           "load_quantized"]
