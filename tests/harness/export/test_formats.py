"""Exports: compressed-tensors folders transformers loads without ptqbench, and ptqbench's own format.

Numbers are checked against independent computations: the integer weights are unpacked and
dequantized by hand from the safetensors file, the fresh process computes perplexity with its own
three lines, and reloaded ptqbench-format models must give bit-identical logits.
"""
from __future__ import annotations

import json
import math
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness import BitSpec, QuantContext, get_method, quant_linears
from harness.atomic import current_umask
from harness.evaluation.evaluate import perplexity
from harness.export.formats import CT_INT, CT_PACKED, MANIFEST, PTQBENCH, TRANSFORMERS_DEQUANTIZE, ExportError
from harness.export.loader import load_quantized
from harness.export.writer import export_model
from harness.quant.reassembly import Reassembled

CPU = QuantContext(device=torch.device("cpu"), seed=0, progress=False)

# Runs in a fresh interpreter: transformers (with compressed-tensors) only, never ptqbench.
FRESH = r"""
import json, math, sys, torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
# before the first forward (which decompresses), a folder loaded compressed holds int32 words, not weights
packed = sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "weight_packed", None), torch.Tensor)
                and m.weight_packed.dtype == torch.int32)
tokens = torch.tensor(json.loads(open(sys.argv[2]).read()))
with torch.no_grad():
    logits = model(tokens).logits[:, :-1]
nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
ours = [m for m in sys.modules if m.split(".")[0] in ("harness", "methods", "ptqbench")]
print(json.dumps({"ppl": math.exp(nll.item()), "imported": ours, "packed": packed}))
"""


def fresh_ppl(folder: Path, tokens: torch.Tensor, tmp_path: Path) -> tuple[float, list[str]]:
    """Perplexity of ``folder`` loaded by transformers in a fresh interpreter, and its linears that loaded packed
    (kept compressed; a folder with ``"dequantize": true`` loads dense)."""
    (tmp_path / "tokens.json").write_text(json.dumps(tokens.tolist()))
    (tmp_path / "fresh.py").write_text(FRESH)
    out = subprocess.run([sys.executable, str(tmp_path / "fresh.py"), str(folder), str(tmp_path / "tokens.json")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["imported"] == []
    return result["ppl"], result["packed"]


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Dense little-endian bit unpacking (compressed-tensors' layout: value i at bit i * bits of the row,
    stored with +2^(bits-1) so the bits are unsigned), written independently; returns the signed values."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    bit = torch.arange(32, dtype=torch.int64)
    stream = ((words.unsqueeze(-1) >> bit) & 1).reshape(words.shape[0], -1)[:, : shape[1] * bits]
    values = (stream.reshape(shape[0], shape[1], bits) << torch.arange(bits, dtype=torch.int64)).sum(-1)
    return values - 2 ** (bits - 1)


def quantized(tiny_model, method: str, bits: str, options: dict | None = None, calib: torch.Tensor | None = None, **scheme):
    spec = BitSpec.parse(bits, **scheme)
    return get_method(method).from_options(options or {}).quantize(tiny_model, spec, calib, CPU).model


CT_CASES = [
    ("W4A16", {"w_symmetric": True}, CT_PACKED),
    ("W3A16", {"w_symmetric": True}, CT_PACKED), ("W4A16g32", {"w_symmetric": True}, CT_PACKED),
    ("W8A8", {}, CT_INT), ("W4A8", {}, CT_INT),
    # ptqbench's default (asymmetric) weight-only specs: packed too, zero points included, as llm-compressor writes them
    ("W4A16", {}, CT_PACKED), ("W3A16", {}, CT_PACKED), ("W4A16g32", {}, CT_PACKED), ("W2A16g32", {}, CT_PACKED),
    ("W8A16", {}, CT_INT),
]


@pytest.mark.parametrize("bits, scheme, fmt", [
    pytest.param(*case, id=f"{case[0]}-{'sym' if case[1] else 'asym'}-{case[2].split('/')[1]}") for case in CT_CASES])
def test_compressed_tensors_export_loads_without_ptqbench_and_matches(tiny_model, tiny_tokens, tmp_path, bits, scheme, fmt):
    model = quantized(tiny_model, "rtn", bits, **scheme)
    result = export_model(model, None, tmp_path / "out")
    assert result.format == fmt and result.reason == ""
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    spec = BitSpec.parse(bits, **scheme)
    assert config["quant_method"] == "compressed-tensors" and list(config["config_groups"]) == ["group_0"]
    group = config["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == fmt.split("/")[1]
    weights = group["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (spec.w_bits, spec.w_symmetric)
    assert (weights["strategy"], weights["group_size"]) == (("group", spec.w_group) if spec.w_group else ("channel", None))
    if spec.quantizes_activations:
        acts = group["input_activations"]
        assert (acts["num_bits"], acts["strategy"], acts["dynamic"]) == (8, "token", True)
    else:
        assert group["input_activations"] is None
    # transformers' loading key, only where its compressed load refuses the packed zero points
    dequantized = fmt == CT_PACKED and not spec.w_symmetric
    assert config.get(TRANSFORMERS_DEQUANTIZE, False) is dequantized

    # the stored integers, unpacked and dequantized by hand, are ptqbench's weights bit for bit
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    offset = 0 if spec.w_symmetric else 2 ** (spec.w_bits - 1)
    for name, q in quant_linears(model):
        shape = tuple(q.weight.shape)
        if fmt == CT_PACKED:
            ints = unpack(tensors[f"{name}.weight_packed"], spec.w_bits, shape)
        else:
            ints = tensors[f"{name}.weight"].long()
        scale = tensors[f"{name}.weight_scale"]
        zero = torch.zeros_like(scale, dtype=torch.long)
        if not spec.w_symmetric:
            z = tensors[f"{name}.weight_zero_point"]
            if fmt == CT_PACKED:  # packed too, down each column of the (rows, groups) zero points
                assert z.dtype == torch.int32 and z.shape == (math.ceil(shape[0] * spec.w_bits / 32), scale.shape[1])
                zero = unpack(z.T.contiguous(), spec.w_bits, (scale.shape[1], shape[0])).T
            else:
                assert z.dtype == torch.int8 and z.shape == scale.shape
                zero = z.long()
        grid = ints + offset  # ptqbench's integers: 0..2^b-1 asymmetric, -(2^(b-1)-1)..2^(b-1)-1 symmetric
        lo, hi = (0, 2**spec.w_bits - 1) if offset else (-(2 ** (spec.w_bits - 1) - 1), 2 ** (spec.w_bits - 1) - 1)
        assert lo <= grid.min() and grid.max() <= hi
        groups = scale.shape[1]
        deq = ((ints.reshape(shape[0], groups, -1) - zero.unsqueeze(-1)).float() * scale.unsqueeze(-1)).reshape(shape)
        assert torch.equal(deq, q.weight.detach()), name

    ours = perplexity(model, tiny_tokens, device=torch.device("cpu"), progress=False)
    theirs, packed = fresh_ppl(tmp_path / "out", tiny_tokens, tmp_path)
    assert abs(theirs - ours) / ours < 1e-3, (ours, theirs)
    assert packed == (sorted(n for n, _ in quant_linears(model)) if fmt == CT_PACKED and not dequantized else [])


@pytest.mark.parametrize("bits, preset", [("W4A16g128", "W4A16_ASYM"), ("W4A16g128-sym", "W4A16"), ("W8A8-sym", "W8A8")])
def test_compressed_tensors_schemes_are_the_presets(bits, preset):
    """llm-compressor's presets (compressed-tensors' PRESET_SCHEMES) for the same specs; the format aside, which
    the presets leave for compressed-tensors to infer and ptqbench declares."""
    from compressed_tensors.quantization import preset_name_to_scheme

    from harness.export.writer import _ct_scheme

    name, _, sym = bits.partition("-")
    spec = BitSpec.parse(name, w_symmetric=bool(sym), a_symmetric=bool(sym))
    fmt = CT_PACKED if spec.w_bits <= 4 else CT_INT
    preset_scheme = preset_name_to_scheme(preset, ["Linear"]).model_dump(mode="json")
    assert preset_scheme["format"] is None
    assert _ct_scheme(spec, ["Linear"], fmt).model_dump(mode="json") == {**preset_scheme, "format": fmt.split("/")[1]}


@pytest.mark.parametrize("bits, scheme", [("W4A16", {}), ("W2A16g32", {}), ("W4A16", {"w_symmetric": True}),
                                          ("W4A8", {}), ("W8A8", {})],
                         ids=["W4A16-asym", "W2A16g32-asym", "W4A16-sym", "W4A8-asym", "W8A8-asym"])
def test_compressed_tensors_export_is_what_llm_compressor_writes(tiny_model, tmp_path, bits, scheme):
    """llm-compressor's save path for the same weights and ranges: a dense model with the scheme applied, the format
    inferred by compressed-tensors, ModelCompressor.compress_model. Same tensors, same quantization_config (ours adds
    only transformers' loading key)."""
    import copy

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    spec = BitSpec.parse(bits, **scheme)
    reference = copy.deepcopy(tiny_model)
    model = quantized(tiny_model, "rtn", bits, **scheme)
    export_model(model, None, tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]

    weights = QuantizationArgs(num_bits=spec.w_bits, symmetric=spec.w_symmetric, strategy="group" if spec.w_group else "channel",
                               group_size=spec.w_group or None)
    acts = None
    if spec.quantizes_activations:
        acts = QuantizationArgs(num_bits=8, symmetric=spec.a_symmetric, strategy="token", dynamic=True)
    apply_quantization_config(reference, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)},
        ignore=["lm_head"], quantization_status="frozen"))
    offset = 0 if spec.w_symmetric else 2 ** (spec.w_bits - 1)  # compressed-tensors' integers are signed
    linears = dict(quant_linears(model))
    with torch.no_grad():
        for name, module in reference.named_modules():
            if name in linears:
                q = linears[name]
                module.weight.copy_(q.weight)
                module.weight_scale.copy_(q.weight_scale.reshape(module.weight_scale.shape))
                module.weight_zero_point.copy_((q.weight_zero.reshape(module.weight_zero_point.shape) - offset))
    compressor = ModelCompressor.from_pretrained_model(reference)
    compressor.compress_model(reference)
    theirs = {k: v for k, v in reference.state_dict().items() if k != "lm_head.weight"}  # tied: written once
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    expected = compressor.quantization_config.model_dump(mode="json")
    assert {k: v for k, v in config.items() if k != TRANSFORMERS_DEQUANTIZE} == expected


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("method, options", [
    ("rtn", {}),
    ("smoothquant", {}),
    ("omniquant", {"epochs": 1, "max_samples": 2}),
    ("qllm", {"epochs": 1, "blocks_per_job": 2, "rank": 2, "grid_steps": 10}),
])
def test_ptqbench_format_reloads_to_identical_logits(tiny_model, tiny_tokens, tmp_path, method, options):
    from tests.methods.test_qllm_reassembly import with_outliers

    model = quantized(with_outliers(tiny_model), method, "W4A4", options, calib=tiny_tokens)
    if method == "qllm":  # what the format exists for: reassembly modules and the folded final-norm bias
        assert any(isinstance(m, Reassembled) for m in model.modules())
        assert model.lm_head.bias is not None
    result = export_model(model, None, tmp_path / "out")
    assert result.format == PTQBENCH and ("4-bit activations" in result.reason or "reassembly" in result.reason)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert len(manifest["linears"]) == len(list(quant_linears(model)))
    reloaded = load_quantized(tmp_path / "out")
    assert type(reloaded).__name__ == type(model).__name__
    assert torch.equal(logits(reloaded, tiny_tokens), logits(model, tiny_tokens))


def test_fp_model_exports_plain_and_a_full_folder_is_not_overwritten(tiny_model, tiny_tokens, tmp_path):
    result = export_model(tiny_model, None, tmp_path / "out")
    assert result.format == "dense" and result.size_bytes > 0
    assert torch.equal(logits(load_quantized(tmp_path / "out"), tiny_tokens), logits(tiny_model, tiny_tokens))
    with pytest.raises(ExportError, match="exists and is not empty"):
        export_model(tiny_model, None, tmp_path / "out")
    # the usual permissions under the umask (safetensors writes its file 0600, mkdtemp its folder 0700)
    mask = current_umask()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").iterdir()]}
    assert modes == {name: (0o777 if name == "out" else 0o666) & ~mask for name in modes}


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_packed_4bit_folder_is_smaller_than_fp(tiny_model, tmp_path, symmetric):
    import copy

    fp = export_model(copy.deepcopy(tiny_model), None, tmp_path / "fp")
    model = quantized(tiny_model, "rtn", "W4A16", w_symmetric=symmetric)
    w4 = export_model(model, None, tmp_path / "w4")
    assert w4.format == CT_PACKED and w4.size_bytes < fp.size_bytes
    # 4 bits a weight: eight weights to an int32 word (the tiny model's widths are multiples of 8)
    tensors = load_file(str(tmp_path / "w4" / "model.safetensors"))
    for name, q in quant_linears(model):
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.numel() * 8 == q.weight.numel(), name


def test_an_attention_quantizer_its_spec_does_not_describe_is_refused(tiny_model, tmp_path):
    """The manifest rebuilds Q/K/V quantizers from their spec: one changed after install would load as another."""
    model = quantized(tiny_model, "rtn", "W4A4", attention=True)
    model.model.layers[1].self_attn.qkv_quant.k.clip_ratio = 0.5
    with pytest.raises(ExportError, match=r"^cannot export model\.layers\.1\.self_attn: its Q/K/V quantizers were changed "
                                          r"after install, so the bit spec W4A4 does not describe them$"):
        export_model(model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_learned_activation_clips_export_as_version_3_and_reload_to_identical_logits(tiny_model, tiny_tokens, tmp_path):
    """set_act_clip on every linear (FlatQuant's LAC): the manifest records it (version 3, which a version-2 reader would
    misread) and load_quantized puts it back; the clip changes the logits, so the reload is not equal by accident."""
    import copy

    from harness.quant.qlinear import set_act_clip

    plain = quantized(tiny_model, "rtn", "W4A4")
    model = copy.deepcopy(plain)
    for _, q in quant_linears(model):
        set_act_clip(q, 0.8, 0.7)
    expected = logits(model, tiny_tokens)
    assert not torch.equal(expected, logits(plain, tiny_tokens))
    export_model(model, None, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["version"] == 3 and all(e["act_clip"] == [0.8, 0.7] for e in manifest["linears"].values())
    assert torch.equal(logits(load_quantized(tmp_path / "out"), tiny_tokens), expected)


def test_a_version_1_folder_loads_and_warns_that_it_lacks_its_attention_quantizers(tiny_model, tmp_path, caplog):
    from harness.quant.attention import attention_quantizers

    model = quantized(tiny_model, "rtn", "W4A4", attention=True)
    export_model(model, None, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["version"] == 2 and len(manifest["attention"]) == 2 and manifest["attention_kernel"] == "sdpa"
    for key in ("attention", "attention_kernel"):  # what a version-1 folder holds
        del manifest[key]
    (tmp_path / "out" / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    with caplog.at_level("WARNING", logger="harness.export.loader"):
        reloaded = load_quantized(tmp_path / "out")
    assert "written without its attention quantizers (format version 1)" in caplog.text
    assert attention_quantizers(reloaded) == []


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe"])
def test_a_prepared_family_exports_in_its_checkpoint_layout_or_ptqbench_format(family, tiny_tokens, tmp_path):
    """FP: a dense folder in the checkpoint's layout (Phi-3's q/k/v fused back), which transformers alone loads to the
    same logits. Quantized: ptqbench's format (transformers' own modules there hold one fused or stacked tensor, which
    a compressed-tensors loader would quantize as one), reloaded into the prepared layout to the same logits."""
    from transformers import AutoModelForCausalLM

    from harness.adapter import PREPARED_MODULES
    from harness.models import tiny_model

    model = tiny_model(family, seed=1)
    assert export_model(model, None, tmp_path / "fp").format == "dense"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fp")
    assert not any(isinstance(m, PREPARED_MODULES) for m in plain.modules())  # transformers' own fused/stacked modules
    torch.testing.assert_close(logits(plain, tiny_tokens), logits(model, tiny_tokens), rtol=1e-6, atol=1e-6)
    assert torch.equal(logits(load_quantized(tmp_path / "fp"), tiny_tokens), logits(model, tiny_tokens))
    model = quantized(model, "rtn", "W4A16", w_symmetric=True)
    result = export_model(model, None, tmp_path / "w4")
    assert result.format == PTQBENCH and f"where the {family} checkpoint fuses or stacks them" in result.reason
    assert torch.equal(logits(load_quantized(tmp_path / "w4"), tiny_tokens), logits(model, tiny_tokens))
