"""Scale benchmark: peak host memory of whole runs on synthetic LLaMAs of growing depth.

Run it with ``ptqbench bench-scale`` (it is slow on CPU: it writes a >= 3 GB model). It

1. generates random LLaMAs (hidden 2048, fp16, one safetensors shard per block, smollm2's
   tokenizer) at 32 and 8 layers into ``<cache>/bench-scale/`` (once; reused afterwards),
2. fills the token cache with the Brown splits (as ``ptqbench prepare`` would before a sweep),
3. runs each method end to end (``harness.run.execute``: lazy load, quantize, block-wise perplexity;
   float32 compute, since CPU fp16 matmuls are slow) in a fresh subprocess, which reports its
   peak RSS (``VmHWM``),
4. prints per run the model's size on disk, the peak RSS, their ratio, the dry-run estimate
   (``harness.engine.memory``), and per method the peak-RSS ratio of the deep over the shallow model.

Targets: peak RSS <= half the model's size on disk, and deep/shallow ratio <= 1.15.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.engine.allocator import allocator_env
from harness.engine.memory import GB, estimate
from harness.errors import ConfigError
from harness.paths import cache_home

log = logging.getLogger(__name__)

# What ``--methods`` names: a method's defaults at the benchmark's size, or a variant of it
# ("<method>:low-memory", the method's ``low_memory`` option: the same results, less memory, more time).
OPTIONS = {"rtn": {}, "smoothquant": {}, "omniquant": {"epochs": 1}, "qllm": {"epochs": 1, "grid_steps": 10}}
VARIANTS = {"low-memory": {"low_memory": True}}


def method_options(label: str) -> tuple[str, dict]:
    """``"qllm:low-memory"`` -> ("qllm", its benchmark options with the variant's)."""
    method, _, variant = label.partition(":")
    if method not in OPTIONS or (variant and variant not in VARIANTS):
        raise ConfigError(f"--methods: {label!r} is not allowed; use one of {', '.join(OPTIONS)}, "
                          f"each optionally with :{' or :'.join(VARIANTS)}")
    return method, {**OPTIONS[method], **VARIANTS.get(variant, {})}


def synthetic_config(hidden: int, layers: int):
    from transformers import AutoConfig

    # LLaMA proportions (TinyLlama's 2048 -> 5632 MLP); smollm2's vocabulary so its tokenizer serves the data
    return AutoConfig.for_model("llama", vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, torch_dtype="float16")


def generate(folder: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """Write a random fp16 LLaMA as one shard per block (never the whole model in memory); reuse it if there."""
    from safetensors.torch import save_file

    from harness.models import ZOO, gguf_folder

    if (folder / "model.safetensors.index.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = synthetic_config(hidden, layers)
    g = torch.Generator().manual_seed(seed)
    std = 0.02  # the HF initializer_range: keeps 32 random blocks' residual stream finite in fp16

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std).half()

    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    inter, kv = config.intermediate_size, config.num_key_value_heads * (hidden // config.num_attention_heads)
    shard("model-embed.safetensors", {"model.embed_tokens.weight": rand(config.vocab_size, hidden),
                                      "model.norm.weight": torch.ones(hidden, dtype=torch.float16)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shard(f"model-layer-{i:03d}.safetensors", {
            p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.weight": rand(kv, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16)})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(tmp)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf_folder("smollm2-135m", ZOO["smollm2-135m"])).save_pretrained(tmp)
    tmp.replace(folder)
    return folder


def prepare_tokens(folder: Path) -> None:
    """Tokenize the Brown splits with the model's tokenizer into the token cache, as ``ptqbench prepare``
    does before a sweep: the measured runs then hold no tokenizer peak (a cold cache adds about 0.8 GB
    to the first run that tokenizes Brown's train split; see harness.data.token_cache)."""
    from transformers import AutoTokenizer

    from harness.data.windows import token_stream

    tokenizer = AutoTokenizer.from_pretrained(folder)
    for split in ("train", "test"):
        token_stream("brown", split, tokenizer)


def disk_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_spec(folder: Path, label: str, samples: int, seqlen: int, windows: int, work_root: Path):
    from harness.bits import BitSpec
    from harness.registry import get_method
    from harness.data.config import CalibrationConfig
    from harness.evaluation.config import EvaluationConfig, PerplexityConfig
    from harness.run.execute import RunSpec

    method, options = method_options(label)
    cls = get_method(method)
    evaluation = EvaluationConfig(ppl=PerplexityConfig(datasets=("brown",), seqlen=seqlen, max_windows=windows))
    calibration = CalibrationConfig("brown", samples, seqlen) if cls.needs_calibration else None
    return RunSpec(str(folder), method, cls.config_class.from_dict(options), BitSpec.parse("W4A8"),
                   calibration, evaluation, device="cpu", dtype="float32", work_root=str(work_root))


@dataclass
class Measured:
    layers: int
    method: str
    disk_bytes: int
    peak_rss: int
    estimate: int
    quantize_s: float
    ppl: float


def measure(folder: Path, method: str, samples: int, seqlen: int, windows: int, allocator: str = "default") -> Measured:
    """Run one method on ``folder`` in a fresh process, which reports its own peak RSS (VmHWM).

    ``allocator``: the host allocator that process starts with (``harness.engine.allocator``, as
    ``executor.host_allocator`` gives a sweep's runs).
    """
    work = folder.parent / "work"
    spec = run_spec(folder, method, samples, seqlen, windows, work)
    args = json.dumps({"folder": str(folder), "method": method, "samples": samples, "seqlen": seqlen, "windows": windows})
    env = {**os.environ, **allocator_env(allocator)}
    proc = subprocess.Popen([sys.executable, "-m", "harness.bench.scale", args], stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    status = proc.wait()
    if status != 0:
        raise RuntimeError(f"bench-scale child for {method} on {folder.name} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    config = json.loads((folder / "config.json").read_text())
    est = estimate(spec)
    return Measured(config["num_hidden_layers"], method, disk_size(folder), result["peak_rss"],
                    est.host_bytes if est else 0, result["quantize_s"], result["ppl"])


def table(rows: list[Measured]) -> str:
    lines = ["| layers | method | on disk GB | peak RSS GB | RSS / disk | estimate GB | quantize s | ppl |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.layers} | {r.method} | {r.disk_bytes / GB:.2f} | {r.peak_rss / GB:.2f} | "
                     f"{r.peak_rss / r.disk_bytes:.2f} | {r.estimate / GB:.2f} | {r.quantize_s:.1f} | {r.ppl:.1f} |")
    by = {(r.layers, r.method): r for r in rows}
    depths = sorted({r.layers for r in rows})
    if len(depths) == 2:
        lines.append("")
        lines.append(f"| method | peak RSS {depths[1]}/{depths[0]} layers |")
        lines.append("|---|---:|")
        for method in dict.fromkeys(r.method for r in rows):
            deep, shallow = by.get((depths[1], method)), by.get((depths[0], method))
            if deep and shallow:
                lines.append(f"| {method} | {deep.peak_rss / shallow.peak_rss:.3f} |")
    return "\n".join(lines)


def child(args: dict) -> None:
    """The measured process: one run through ``execute``; prints one JSON line."""
    from harness.run.execute import execute, work_dir
    from harness.run.workdir import discard

    spec = run_spec(Path(args["folder"]), args["method"], args["samples"], args["seqlen"], args["windows"],
                    Path(args["folder"]).parent / "work")
    record = execute(spec, progress=False)
    discard(work_dir(spec))
    peak = vm_hwm()
    print(f"bench-scale child {args['method']} {Path(args['folder']).name}: VmHWM {peak / GB:.2f} GB", file=sys.stderr)
    print(json.dumps({"ppl": record.metrics["ppl"]["brown"], "quantize_s": record.cost["phases_s"]["quantize"],
                      "peak_rss": peak}))


def vm_hwm() -> int:
    """This process's peak RSS (``VmHWM``) in bytes.

    Not ``ru_maxrss``: Linux carries the parent's RSS high-water mark over fork+exec into the
    child's ``ru_maxrss``, so a parent that generated a 3 GB model would inflate every child's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bench_root() -> Path:
    return cache_home() / "bench-scale"


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("PTQBENCH_THREADS", "2")))
    child(json.loads(sys.argv[1]))
