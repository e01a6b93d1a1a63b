"""The GPTQ solver against a direct transcription of the official loop (IST-DASLab/gptq 2d65066,
``gptq.py`` ``fasterquant`` with ``quant.py``'s ``Quantizer``, asymmetric, per channel), on small
matrices: the same weights, group by group and column by column; plus what GPTQ is for (a smaller
reconstruction error than rounding to nearest on the same grid) and the bad-input lines."""
from __future__ import annotations

import copy

import pytest
import torch

from harness.bits import BitSpec
from harness.errors import ConfigError
from harness.quant.gptq import FixedGridQuantizer, GPTQOptions, Hessian, SingularHessianError, gptq_solve
from harness.quant.quantizer import group_view


class OfficialQuantizer:
    """quant.py's Quantizer.find_params / quantize for weights, perchannel=True, sym=False, mse=False."""

    def __init__(self, bits: int) -> None:
        self.maxq = torch.tensor(2**bits - 1)

    def find_params(self, x: torch.Tensor) -> None:
        tmp = torch.zeros(x.shape[0])
        xmin = torch.minimum(x.min(1)[0], tmp)
        xmax = torch.maximum(x.max(1)[0], tmp)
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        self.scale = ((xmax - xmin) / self.maxq).reshape(-1, 1)
        self.zero = torch.round(-xmin.reshape(-1, 1) / self.scale)


def official_quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def official_fasterquant(W, H, bits, blocksize=128, percdamp=.01, groupsize=-1, actorder=False, static_groups=False):
    """gptq.py's fasterquant, transcribed (CPU, no Conv handling, no prints)."""
    W, H = W.clone().float(), H.clone()
    quantizer = OfficialQuantizer(bits)
    quantizer.find_params(W)
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if static_groups:
        groups = []
        for i in range(0, columns, groupsize):
            q = copy.deepcopy(quantizer)
            q.find_params(W[:, i:(i + groupsize)])
            groups.append(q)
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        invperm = torch.argsort(perm)
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        quantizer.find_params(W[:, (i1 + i):(i1 + i + groupsize)])
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    quantizer = groups[idx // groupsize]
            q = official_quantize(w.unsqueeze(1), quantizer.scale, quantizer.zero, quantizer.maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, invperm]
    return Q


def official_hessian(batches):
    """gptq.py's add_batch over (batch, seq, columns) inputs."""
    H, n = torch.zeros(batches[0].shape[-1], batches[0].shape[-1]), 0
    for inp in batches:
        tmp = inp.shape[0]
        inp = inp.reshape(-1, inp.shape[-1]).t()
        H *= n / (n + tmp)
        n += tmp
        inp = (2 / n) ** 0.5 * inp.float()
        H += inp.matmul(inp.t())
    return H


def problem(rows=24, columns=96, seed=0, dead=(5,)):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 16, columns, generator=g) * torch.linspace(0.2, 3.0, columns) for _ in range(3)]
    for c in dead:
        for b in batches:
            b[..., c] = 0  # an input that is always zero: a dead column
    W = torch.randn(rows, columns, generator=g) * 0.1
    return W, batches


def test_the_hessian_is_the_official_running_mean():
    _, batches = problem()
    h = Hessian(96)
    for b in batches:
        h.add(b)
    assert h.samples == 6
    torch.testing.assert_close(h.matrix, official_hessian(batches), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits, group, block, act_order, static", [
    ("W4A16", None, 128, False, False),   # per channel, one block
    ("W3A16", None, 32, False, False),    # lazy batch updates across blocks
    ("W4A16", 32, 64, False, False),      # groups inside a block read the stale outer W, as the official code
    ("W3A16", 16, 32, True, True),        # act_order with static groups
    ("W4A16", None, 32, True, False),     # act_order per channel
])
def test_gptq_equals_the_official_loop(bits, group, block, act_order, static):
    W, batches = problem()
    H = official_hessian(batches)
    spec = BitSpec.parse(bits + (f"g{group}" if group else ""))
    ours, scale, zero, loss = gptq_solve(W, H, spec, GPTQOptions(block_size=block, act_order=act_order, static_groups=static))
    theirs = official_fasterquant(W, H, spec.w_bits, blocksize=block, groupsize=group or -1, actorder=act_order,
                                  static_groups=static)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert loss > 0 and torch.equal(ours[:, 5], torch.zeros(24))  # the dead column
    # the returned grid is the one the weight sits on: quantizing it again changes nothing
    again = FixedGridQuantizer(spec, scale, zero)(ours)
    torch.testing.assert_close(again, ours, rtol=0, atol=1e-6)
    assert scale.shape == (group_view(ours, spec).shape[0], 1)


def test_gptq_reconstructs_better_than_rounding_to_nearest():
    """GPTQ's gain comes from correlated inputs, as a model's activations are: with inputs mixed by a
    random matrix its output error is about half of RTN's on the same grid (0.49 at W3A16 here)."""
    from harness.quant.quantizer import quantize_weight

    W, batches = problem(dead=())
    mix = torch.randn(96, 96, generator=torch.Generator().manual_seed(1)) / 96**0.5 + torch.eye(96)
    batches = [b @ mix for b in batches]
    X = torch.cat([b.reshape(-1, 96) for b in batches])
    spec = BitSpec.parse("W3A16")
    Q, *_ = gptq_solve(W, official_hessian(batches), spec, GPTQOptions(zero_in_range=False))
    error = lambda q: ((X @ (W - q).T) ** 2).sum().item()  # noqa: E731
    assert error(Q) < 0.6 * error(quantize_weight(W, spec))


def test_bad_options_are_one_line_before_any_work():
    W, batches = problem()
    H = official_hessian(batches)
    with pytest.raises(ConfigError, match=r"^act_order: with groups \(W4A16g32\) it needs static_groups: true"):
        gptq_solve(W, H, BitSpec.parse("W4A16g32"), GPTQOptions(act_order=True))
    with pytest.raises(ConfigError, match=r"^bits: group 64 does not divide the input width 96$"):
        gptq_solve(W, H, BitSpec.parse("W4A16g64"))
    with pytest.raises(ConfigError, match=r"^damp: 0 is not allowed"):
        gptq_solve(W, H, BitSpec.parse("W4A16"), GPTQOptions(damp=0))
    with pytest.raises(SingularHessianError, match="not positive definite"):
        gptq_solve(W, -torch.eye(96), BitSpec.parse("W4A16"))
