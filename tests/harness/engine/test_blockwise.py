"""The block-wise engine: protocol (targets, next-block inputs), the hooks' lifecycle, runs without data, equivalence
with global RTN, training loop."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness import BitSpec, freeze, quantize_block, quantize_linears
from harness.engine.blockwise import mean_squared_error, run_blockwise, train
from harness.engine.hooks import BlockHooks, BlockJob
from harness.errors import TrainingDivergedError

W4A4 = BitSpec.parse("W4A4")


def rtn_solve(job: BlockJob) -> dict:
    for layer in job.layers:
        for q in quantize_block(layer, W4A4, job.adapter).values():
            q.freeze()
    return {}


CPU = torch.device("cpu")


@pytest.mark.parametrize("blocks_per_job", [1, 2])
def test_blockwise_rtn_equals_global_rtn(tiny_model, tiny_tokens, device, blocks_per_job):
    global_rtn = copy.deepcopy(tiny_model)
    quantize_linears(global_rtn, W4A4)
    freeze(global_rtn)
    stats = run_blockwise(tiny_model, tiny_tokens, BlockHooks(solve=rtn_solve, blocks_per_job=blocks_per_job), device=device,
                          progress=False)
    assert [s["block"] for s in stats] == list(range(0, 2, blocks_per_job))
    a, b = tiny_model.state_dict(), global_rtn.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with torch.no_grad():
        assert torch.equal(tiny_model(tiny_tokens).logits, global_rtn(tiny_tokens).logits)


def test_without_the_teacher_pass_the_student_path_is_the_same(tiny_model, tiny_tokens):
    """teacher=False: no FP pass, so no recorded inputs and no output_mse; the student inputs each job sees are
    the quantized model's, exactly as with the teacher pass."""
    seen = {}

    def solve(job: BlockJob, teacher: bool) -> dict:
        seen.setdefault(teacher, []).append((job.q_inputs.clone(), len(job.inputs)))
        return rtn_solve(job)

    with_teacher = copy.deepcopy(tiny_model)
    a = run_blockwise(with_teacher, tiny_tokens, BlockHooks(solve=lambda j: solve(j, True)), device=CPU, progress=False)
    b = run_blockwise(tiny_model, tiny_tokens, BlockHooks(solve=lambda j: solve(j, False), teacher=False), device=CPU,
                      progress=False)
    assert all("output_mse" in s for s in a) and not any("output_mse" in s for s in b)
    for (x_teacher, _), (x_plain, records) in zip(seen[True], seen[False]):
        assert torch.equal(x_teacher, x_plain) and records == 0
    with torch.no_grad():
        assert torch.equal(tiny_model(tiny_tokens).logits, with_teacher(tiny_tokens).logits)
    with pytest.raises(ValueError, match="record needs the teacher pass"):
        run_blockwise(tiny_model, tiny_tokens, BlockHooks(solve=rtn_solve, record=("mlp.down_proj",), teacher=False), device=CPU)


class Logged(BlockHooks):
    """Hooks that log every call and what the job holds then: the lifecycle's order, from the outside."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.log: list[tuple] = []

    def before(self, job: BlockJob) -> None:
        quantized = any(type(m).__name__ == "QuantLinear" for layer in job.layers for m in layer.modules())
        self.log.append(("before", job.index, len(job.inputs), quantized))
        for layer in job.layers:  # a structural change before any pass: the teacher sees it
            layer.post_attention_layernorm.weight.data.mul_(2.0)

    def solve(self, job: BlockJob) -> dict:
        self.log.append(("solve", job.index, len(job.inputs), None if job.targets is None else job.targets.clone()))
        return rtn_solve(job)

    def after(self, job: BlockJob) -> None:
        self.log.append(("after", job.index, None if job.q_inputs is None else job.q_inputs.clone()))


def test_hooks_run_before_the_teacher_pass_solve_between_the_passes_and_after_the_student_pass(tiny_model, tiny_tokens):
    fp = copy.deepcopy(tiny_model)
    for layer in fp.model.layers:  # what before() does to every block
        layer.post_attention_layernorm.weight.data.mul_(2.0)
    hooks = Logged(record=("mlp.down_proj",))
    run_blockwise(tiny_model, tiny_tokens, hooks, device=CPU, progress=False)
    assert [(e[0], e[1]) for e in hooks.log] == [("before", 0), ("solve", 0), ("after", 0), ("before", 1), ("solve", 1), ("after", 1)]
    assert hooks.log[0][2:] == (0, False)  # before: no record yet, nothing quantized
    assert hooks.log[1][2] == 1  # solve: the teacher pass recorded the block's inputs
    with torch.no_grad():
        fp_hidden = fp(tiny_tokens, output_hidden_states=True).hidden_states
        q_hidden = tiny_model(tiny_tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hooks.log[1][3], fp_hidden[1], rtol=1e-5, atol=1e-6)  # targets of the changed FP block
    torch.testing.assert_close(hooks.log[2][2], q_hidden[1], rtol=1e-5, atol=1e-6)  # after: the student pass's outputs


def test_without_calibration_data_the_blocks_are_walked_in_order_without_any_pass(tiny_model, monkeypatch):
    """tokens=None: load, before, solve, after for every group, no activation buffer and no block forward."""
    reference = copy.deepcopy(tiny_model)
    quantize_linears(reference, W4A4)
    freeze(reference)
    monkeypatch.setattr("harness.adapter.LlamaAdapter.run_layer", lambda *a, **k: pytest.fail("a block ran"))
    hooks = Logged(blocks_per_job=2)
    stats = run_blockwise(tiny_model, None, hooks, device=CPU, progress=False)
    assert stats == [{"block": 0}]
    assert [(e[0], e[1]) for e in hooks.log] == [("before", 0), ("solve", 0), ("after", 0)]
    assert hooks.log[1][3] is None and hooks.log[2][2] is None  # no targets, no student outputs
    for layer in reference.model.layers:
        layer.post_attention_layernorm.weight.data.mul_(2.0)
    got, expected = tiny_model.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(ValueError, match="record needs calibration tokens"):
        run_blockwise(tiny_model, None, BlockHooks(record=("mlp.down_proj",)), device=CPU)


def test_inputs_targets_and_output_mse_follow_the_protocol(tiny_model, tiny_tokens):
    """Block i gets the FP model's hidden state i as FP input and the quantized model's as student input."""
    fp_model = copy.deepcopy(tiny_model)
    seen = []

    def solve(job: BlockJob) -> dict:
        seen.append((job.fp_inputs.clone(), job.q_inputs.clone(), job.targets.clone()))
        return rtn_solve(job)

    stats = run_blockwise(tiny_model, tiny_tokens, BlockHooks(solve=solve), device=CPU, progress=False)
    with torch.no_grad():
        fp_hidden = fp_model(tiny_tokens, output_hidden_states=True).hidden_states
        q_hidden = tiny_model(tiny_tokens, output_hidden_states=True).hidden_states
    for i, (fp_in, q_in, target) in enumerate(seen):
        torch.testing.assert_close(fp_in, fp_hidden[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q_in, q_hidden[i], rtol=1e-5, atol=1e-6)
        if i + 1 < len(seen):  # the last hidden state HF returns is after the final norm
            torch.testing.assert_close(target, fp_hidden[i + 1], rtol=1e-5, atol=1e-6)
            expected = F.mse_loss(q_hidden[i + 1], fp_hidden[i + 1]).item()
            assert stats[i]["output_mse"] == pytest.approx(expected, rel=1e-4)
    assert not torch.equal(seen[1][0], seen[1][1])  # W4A4 changed the student's inputs


def test_mean_squared_error_matches_torch():
    a, b = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    assert mean_squared_error(a, b) == pytest.approx(F.mse_loss(a, b).item(), rel=1e-6)


def test_nan_loss_names_block_and_epoch(tiny_model, tiny_tokens):
    def solve(job: BlockJob) -> dict:
        p = torch.nn.Parameter(torch.ones(1))
        calls = {"n": 0}

        def loss_fn(idx):
            calls["n"] += 1
            bad = job.index == 1 and calls["n"] > len(job.q_inputs)  # block 1 diverges in its second epoch
            return (p * (float("nan") if bad else 1.0)).sum()

        train([{"params": [p], "lr": 1e-3}], loss_fn, len(job.q_inputs), epochs=3, label=job.label)
        return rtn_solve(job)

    with pytest.raises(TrainingDivergedError, match=r"block 1, epoch 1: loss is nan"):
        run_blockwise(tiny_model, tiny_tokens, BlockHooks(solve=solve), device=CPU, progress=False)


def _fit(seed: int) -> tuple[list[float], torch.Tensor]:
    torch.manual_seed(123)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    w = torch.nn.Parameter(torch.zeros(4, 1))
    history = train([{"params": [w], "lr": 0.05}], lambda idx: F.mse_loss(x[idx] @ w, y[idx]), 16,
                    epochs=3, batch_size=4, seed=seed, linear_decay=True)
    return history, w.detach().clone()


def test_seeded_training_is_reproducible_and_reduces_loss():
    h1, w1 = _fit(seed=0)
    h2, w2 = _fit(seed=0)
    h3, w3 = _fit(seed=1)
    assert h1 == h2 and torch.equal(w1, w2)
    assert not torch.equal(w1, w3)  # another seed visits the samples in another order
    assert len(h1) == 3 and h1[-1] < h1[0]


@pytest.mark.parametrize("shuffle", [True, False])
def test_sample_order_is_seeded_shuffle_or_in_order(shuffle):
    """shuffle=False: every epoch visits 0, 1, ..., n-1 (the official OmniQuant loop); True: a permutation per
    epoch, the seeded generator's, so not the identity and not the same in both epochs."""
    w = torch.nn.Parameter(torch.zeros(1))
    seen = []

    def loss_fn(idx):
        seen.append(idx.tolist())
        return (w - 1).pow(2).sum()

    train([{"params": [w], "lr": 0.1}], loss_fn, 7, epochs=2, batch_size=2, seed=3, shuffle=shuffle)
    epochs = [sum(seen[:4], []), sum(seen[4:], [])]
    assert len(seen) == 8 and [len(b) for b in seen[:4]] == [2, 2, 2, 1]
    g = torch.Generator().manual_seed(3)
    expected = [torch.randperm(7, generator=g).tolist() for _ in range(2)] if shuffle else [list(range(7))] * 2
    assert epochs == expected
    if shuffle:
        assert epochs[0] != list(range(7)) and epochs[0] != epochs[1]


def test_train_without_parameters_or_epochs_is_a_no_op():
    w = torch.nn.Parameter(torch.ones(1))
    assert train([], lambda idx: w.sum(), 4, epochs=2) == []
    assert train([{"params": [w], "lr": 1.0}], lambda idx: w.sum(), 4, epochs=0) == []
    assert w.item() == 1.0


def test_cosine_schedule_is_torchs_cosine_annealing_per_group():
    """cosine_min_lr: each group's lr follows CosineAnnealingLR(T_max = all steps, eta_min) stepped once per step."""
    w, v = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    seen = []
    groups = [{"params": [w], "lr": 0.05}, {"params": [v], "lr": 0.5}]

    def loss_fn(idx):
        seen.append([g["lr"] for g in groups])
        return (w - 1).pow(2).sum() + (v + 1).pow(2).sum()

    train(groups, loss_fn, 8, epochs=3, batch_size=4, cosine_min_lr=1e-4, shuffle=False)
    reference = torch.optim.AdamW([{"params": [torch.zeros(1)], "lr": 0.05}, {"params": [torch.zeros(1)], "lr": 0.5}])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=6, eta_min=1e-4)
    expected = []
    for _ in range(6):
        expected.append([g["lr"] for g in reference.param_groups])
        reference.step()
        cosine.step()
    assert len(seen) == 6
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want, rel=1e-12)


def test_relative_loss_backpropagates_the_gradient_over_the_loss_and_reports_the_loss():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    w = torch.nn.Parameter(torch.zeros(3, 1))
    grads = []
    w.register_hook(lambda g: grads.append(g.clone()))
    history = train([{"params": [w], "lr": 0.01}], lambda idx: F.mse_loss(x[idx] @ w, y[idx]), 8, epochs=1,
                    batch_size=8, relative_loss=True)
    start = torch.zeros(3, 1, requires_grad=True)
    loss = F.mse_loss(x @ start, y)
    (grad,) = torch.autograd.grad(loss, start)
    assert history == [pytest.approx(loss.item())]
    assert torch.allclose(grads[0], grad / loss.detach(), rtol=1e-6)


def test_drop_last_leaves_out_the_short_batch_and_takes_all_samples_when_fewer_than_a_batch():
    w = torch.nn.Parameter(torch.zeros(1))
    for n, batches in ((10, [[0, 1, 2, 3], [4, 5, 6, 7]]), (3, [[0, 1, 2]])):
        seen = []
        train([{"params": [w], "lr": 0.1}], lambda idx: seen.append(idx.tolist()) or (w - 1).pow(2).sum(), n,
              epochs=1, batch_size=4, shuffle=False, drop_last=True)
        assert seen == batches


def test_blocks_per_job_must_be_positive(tiny_model, tiny_tokens):
    with pytest.raises(ValueError, match="blocks_per_job"):
        run_blockwise(tiny_model, tiny_tokens, BlockHooks(solve=rtn_solve, blocks_per_job=0), device=CPU)


def test_job_geometry_and_label(tiny_model, tiny_tokens):
    seen = []
    hooks = BlockHooks(solve=lambda job: seen.append((job.label, job.attention_geometry())) or rtn_solve(job), blocks_per_job=2)
    run_blockwise(tiny_model, tiny_tokens, hooks, device=CPU, progress=False)
    assert seen == [("blocks 0-1", (4, 2, 16))]


def test_gradients_on_block_weights_are_released(tiny_model, tiny_tokens):
    """A method whose loss reaches the block weights must not leave their .grad behind (memory grows with depth)."""
    def solve(job: BlockJob) -> dict:
        p = torch.nn.Parameter(torch.ones(1))
        train([{"params": [p], "lr": 1e-3}], lambda idx: p * job.forward(job.q_inputs[idx]).square().mean(),
              len(job.q_inputs), epochs=1)
        assert job.layers[0].mlp.down_proj.weight.grad is not None  # the loss did reach them
        return rtn_solve(job)

    run_blockwise(tiny_model, tiny_tokens, BlockHooks(solve=solve), device=CPU, progress=False)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_activations_are_preallocated_buffers_in_the_model_dtype(tiny_model, tiny_tokens):
    """Three buffers for the whole run, reused in place (no per-block copies), in the model's dtype."""
    model = tiny_model.to(torch.bfloat16)
    seen = []

    def solve(job: BlockJob) -> dict:
        seen.append({t.data_ptr() for t in (job.fp_inputs, job.q_inputs, job.targets)})
        assert {job.fp_inputs.dtype, job.q_inputs.dtype, job.targets.dtype} == {torch.bfloat16}
        assert job.rows(job.q_inputs, slice(0, 2)).dtype == torch.float32  # what the float32 blocks get
        return rtn_solve(job)

    run_blockwise(model, tiny_tokens, BlockHooks(solve=solve), device=CPU, progress=False)
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == 3
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # blocks went back to the model's dtype
