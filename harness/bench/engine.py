"""Peak memory of the block-wise engine against model depth (``ptqbench bench-engine``).

The engine's promise is that only one block and a few activation tensors are on the compute
device at a time, so its working memory must not grow with the number of layers. This builds two
random LLaMAs of the same width and different depths, runs the engine on each with a small
training step per block (RTN quantization + one epoch of AdamW on the block's norm weights, so
autograd memory is included), and reports:

- on CUDA: ``torch.cuda.max_memory_allocated`` during the run (the model itself stays on CPU);
- on CPU: the peak resident set size during the run minus the resident size just before it
  (the model already sits in CPU memory, so only what the engine adds is counted).

Each depth runs in a fresh process so that memory the allocator kept from one run cannot hide
the next run's peak.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class EngineMemory:
    layers: int
    hidden: int
    model_bytes: int  # parameters of the whole model
    block_bytes: int  # parameters of one decoder block
    peak_bytes: int  # what the engine used on the compute device (see module docstring)
    device: str
    seconds: float


def _measure(layers: int, hidden: int, samples: int, seqlen: int, device: str) -> dict:
    import time

    from harness.bits import BitSpec
    from harness.engine.blockwise import run_blockwise, train
    from harness.engine.hooks import BlockHooks
    from harness.models import tiny_llama
    from harness.quant.qlinear import quantize_block
    from harness.run.costs import PeakRSS, current_rss

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dev = torch.device(device)
    model = tiny_llama(seed=0, vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                       num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                       num_key_value_heads=max(1, hidden // 128))
    tokens = torch.randint(0, 256, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    spec = BitSpec.parse("W4A4")

    def solve(job):
        for layer in job.layers:
            for p in layer.parameters():
                p.requires_grad_(False)  # as a method does: only its own parameters are trained
            linears = quantize_block(layer, spec, job.adapter)
            norms = [p.requires_grad_(True) for n, p in layer.named_parameters() if "norm" in n]
            train([{"params": norms, "lr": 1e-3}],
                  lambda idx: F.mse_loss(job.forward(job.rows(job.q_inputs, idx)), job.rows(job.targets, idx)),
                  len(job.q_inputs), epochs=1, device=job.device)
            for q in linears.values():
                q.freeze()
        return {}

    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        run_blockwise(model, tokens, BlockHooks(solve=solve), device=dev, progress=False)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        before = current_rss()
        rss = PeakRSS(interval=0.002).start()
        run_blockwise(model, tokens, BlockHooks(solve=solve), device=dev, progress=False)
        peak = rss.stop() - before
    return asdict(EngineMemory(layers, hidden, model_bytes, block_bytes, int(peak), dev.type, time.perf_counter() - t0))


def engine_memory(depths: tuple[int, ...] = (4, 16), hidden: int = 256, samples: int = 4, seqlen: int = 128,
                  device: str = "auto") -> list[EngineMemory]:
    """Measure the engine at each depth, each in a fresh process; see the module docstring."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = multiprocessing.get_context("spawn")
    results = []
    for layers in depths:
        with ctx.Pool(1) as pool:
            results.append(EngineMemory(**pool.apply(_measure, (layers, hidden, samples, seqlen, device))))
    return results
