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

from dataclasses import dataclass
from pathlib import Path

from harness.errors import PtqbenchError

MANIFEST = "ptqbench_quant.json"
INFO = "ptqbench_export.json"
# 2: the attention quantizers, q/k/v output quantizers and attention kernel. A version-1 folder holds none of them, so
# it loads, but a model whose run quantized Q/K/V loads without those quantizers (load_quantized warns).
# 3: learned activation clips (a linear's "act_clip", an attention's "clips") and transforms of Q and K after RoPE
# ("q_transform", "k_transform"), which a version-2 reader would drop; a folder without them is written as version 2.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CT_PACKED, CT_INT, PTQBENCH, DENSE = "compressed-tensors/pack-quantized", "compressed-tensors/int-quantized", "ptqbench", "dense"
REASSEMBLY_BUFFERS = ("src", "scale", "group", "count")

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
