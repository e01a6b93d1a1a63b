"""What the block-wise engine and a method hand each other: the job (one block group and its
activations) and the method's hooks (what the engine should run for it, and the calls it makes).

A block-wise method describes itself once, in a :class:`BlockHooks`, and calls
``run_blockwise(model, tokens, hooks, device=...)`` (``harness.engine.blockwise``). For every block
group, in order, the engine loads the group, then calls:

1. ``hooks.before(job)``: change the blocks' structure before any pass (a rotation folded into the
   weights, an online transform, an attention quantizer);
2. the teacher pass (FP blocks on the FP inputs: ``job.targets``, and the inputs of the submodules
   named in ``record`` in ``job.inputs``), unless ``teacher`` is off;
3. ``hooks.solve(job) -> stats``: quantize (and train) the blocks; they must leave it quantized;
4. the student pass: the quantized blocks on the student inputs give the next group's student
   inputs (with the activation quantizers off when ``student_activations`` is off);
5. ``hooks.after(job)``: anything that needs the student outputs (``job.q_inputs`` now holds them),
   e.g. QLLM keeps the last block's outputs for its final-norm tune;

then writes the group back (and, for a lazy model, a checkpoint holding ``hooks.state``). A method
adds what it needs here, never a parameter to the engine. Subclass it, or pass the functions::

    hooks = BlockHooks(solve=quantize_group, record=("mlp.down_proj",))   # quantize_group(job) -> stats
    stats = run_blockwise(model, calibration, hooks, device=context.device)

(docs/methods/README.md has an example of each hook.)

With ``tokens=None`` the engine walks the blocks in the same order (load, before, solve, after,
write) with no pass and no activation buffer: ``job.fp_inputs``, ``job.q_inputs``, ``job.targets``
and ``job.position_embeddings`` are then None (a method that rounds without data, QuaRot with RTN).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.adapter import LlamaAdapter
from harness.engine.calibration_stats import InputRecord


@dataclass
class BlockJob:
    """One step of the engine: the blocks being quantized and their calibration activations.

    Activations are (samples, seqlen, hidden) buffers in the model's dtype, on ``device`` or, when
    they would not fit there, in (pinned) host memory; :meth:`rows` hands a batch of them to the
    blocks as float32 on ``device``. All three are None in a run without calibration data.
    """

    index: int  # index of the first block of this job
    layers: list[nn.Module]
    fp_inputs: torch.Tensor | None  # what the FP model feeds these blocks
    q_inputs: torch.Tensor | None  # what the model quantized so far feeds them (after the student pass: their outputs)
    targets: torch.Tensor | None  # FP blocks' outputs on fp_inputs: the teacher
    position_embeddings: Any  # the adapter's RoPE for these blocks' sequences (LlamaAdapter.position_embeddings); None without data
    adapter: LlamaAdapter
    device: torch.device
    model_config: Any = None
    # per block of this job: the inputs of the submodules named in the hooks' ``record`` during the
    # teacher pass (FP blocks on FP inputs)
    inputs: list[InputRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        last = self.index + len(self.layers) - 1
        return f"block {self.index}" if last == self.index else f"blocks {self.index}-{last}"

    def attention_geometry(self) -> tuple[int, int, int]:
        """(num_heads, num_kv_heads, head_dim) of these blocks, from the model config."""
        return self.adapter.attention_geometry(self.model_config)

    def rows(self, t: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        """Samples ``idx`` of an activation buffer as float32 on the compute device."""
        return t[idx].to(self.device, torch.float32, non_blocking=True)

    def forward(self, x: torch.Tensor, layers: Iterable[nn.Module] | None = None) -> torch.Tensor:
        """Run ``x`` (batch, seqlen, hidden) through ``layers`` (default: all of this job's)."""
        for layer in self.layers if layers is None else layers:
            x = self.adapter.run_layer(layer, x, self.position_embeddings)
        return x

    @torch.no_grad()
    def forward_all(self, x: torch.Tensor, layers: Iterable[nn.Module] | None = None, batch_size: int = 1,
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` over every sample in mini-batches, without gradients, written into ``out``.

        ``out`` (default: a new buffer like ``x``) may be ``x`` itself: samples are independent, so
        each batch is read before its rows are overwritten.
        """
        layers = list(self.layers if layers is None else layers)
        out = torch.empty_like(x) if out is None else out
        for i in range(0, len(x), batch_size):
            out[i : i + batch_size] = self.forward(self.rows(x, slice(i, i + batch_size)), layers).to(out.dtype)
        return out


JobFn = Callable[[BlockJob], Any]


class BlockHooks:
    """A block-wise method's side of the engine (module docstring): settings the engine reads, and the
    lifecycle it calls per block group.

    Settings (constructor keywords, or attributes a subclass sets):

    - ``teacher``: run the FP teacher pass (``job.targets``, ``job.inputs``, ``output_mse`` in the stats);
      off for a method that uses neither the FP inputs nor the targets (GPTQ: one pass per block less);
    - ``record``: submodules of a block (``"self_attn.q_proj"``) whose inputs the teacher pass records
      into ``job.inputs`` (per-channel max |X|), keeping the first ``keep_samples`` samples of each;
    - ``student_activations``: off computes the student inputs with the blocks' activation and attention
      quantizers off (weights quantized, activations FP), as QuaRot's official GPTQ loop propagates them;
    - ``blocks_per_job``: decoder blocks per group (QLLM trains several jointly);
    - ``state``: the method's own tensors that must survive a killed run (checkpointed after every group
      of a lazy model, restored in place on resume).
    """

    def __init__(self, *, before: JobFn | None = None, solve: JobFn | None = None, after: JobFn | None = None,
                 teacher: bool = True, record: tuple[str, ...] = (), keep_samples: int = 0,
                 student_activations: bool = True, blocks_per_job: int = 1,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        self._before, self._solve, self._after = before, solve, after
        self.teacher = teacher
        self.record = tuple(record)
        self.keep_samples = keep_samples
        self.student_activations = student_activations
        self.blocks_per_job = blocks_per_job
        self.state: dict[str, torch.Tensor] = {} if state is None else state

    def check(self, has_data: bool) -> None:
        """Refuse settings the engine cannot serve (a programming error, not a user's: ``ValueError``)."""
        if self.blocks_per_job < 1:
            raise ValueError(f"blocks_per_job must be >= 1, got {self.blocks_per_job}")
        if self.record and not self.teacher:
            raise ValueError("record needs the teacher pass")
        if self.record and not has_data:
            raise ValueError("record needs calibration tokens")

    def before(self, job: BlockJob) -> None:
        """Change the blocks' structure before any pass (rotations, online transforms, installed quantizers)."""
        if self._before is not None:
            self._before(job)

    def solve(self, job: BlockJob) -> dict | None:
        """Quantize (and train) ``job.layers``, leaving them quantized; return stats worth keeping with the run."""
        return self._solve(job) if self._solve is not None else None

    def after(self, job: BlockJob) -> None:
        """Anything after the student pass (``job.q_inputs`` holds the quantized blocks' outputs)."""
        if self._after is not None:
            self._after(job)
