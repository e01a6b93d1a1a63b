"""Loading an export folder back (``harness.export.formats`` describes both formats): ``load_quantized``
rebuilds the quantized model a folder was written from, its logits equal to the exported model's."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.adapter import SUPPORTED_MODEL_TYPES, get_adapter
from harness.bits import BitSpec
from harness.export.formats import CT_INT, CT_PACKED, INFO, MANIFEST, PTQBENCH, READABLE_VERSIONS, REASSEMBLY_BUFFERS, ExportError
from harness.quant import attention
from harness.quant.online import online_transform
from harness.quant.qlinear import QuantLinear, set_act_clip
from harness.quant.quantizer import ActQuantizer
from harness.quant.reassembly import Reassembled, Reassembly

log = logging.getLogger(__name__)


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
    buffers = {k for k in tensors if any(k == f"{p}.reassembly.{b}" for p in manifest["reassembly"] for b in REASSEMBLY_BUFFERS)}
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
        reassembly = Reassembly(*(tensors[f"{name}.reassembly.{b}"] for b in REASSEMBLY_BUFFERS))
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
