"""The qllm method (methods/qllm/method.py): config, an end-to-end tiny run, and smollm2 vs RTN."""
from __future__ import annotations

import pytest
import torch

from harness import BitSpec, ConfigError, LlamaAdapter, QuantContext, get_method, quant_linears
from methods.qllm import QLLMConfig
from harness.calibration_stats import channel_abs_max as channel_max
from tests.methods.test_qllm_reassembly import site_features, with_outliers

W4A4 = BitSpec.parse("W4A4")


@pytest.mark.parametrize("options, field", [
    ({"assembly": True, "disassembly": False}, "assembly"),
    ({"theta": "fixed"}, "theta_value"),
    ({"theta_value": 2.0}, "theta_value"),
    ({"theta": "sometimes"}, "theta"),
    ({"channel_ratio": 0}, "channel_ratio"),
    ({"rank": 0}, "rank"),
    ({"epochs": -1}, "epochs"),
    ({"final_norm": "bias"}, "final_norm"),
    ({"ranks": 4}, "ranks"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        QLLMConfig.from_dict(options)


def test_config_round_trips():
    cfg = QLLMConfig(theta="fixed", theta_value=3.0, rank=8, final_norm="off")
    assert QLLMConfig.from_dict(cfg.to_dict()) == cfg


def test_tiny_end_to_end(tiny_model, tiny_tokens):
    model = with_outliers(tiny_model)
    widths = {n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():  # the FP outlier statistics of block 0, computed independently
        hidden = model.model.embed_tokens(tiny_tokens)
        feats = site_features(model.model.layers[0], hidden, LlamaAdapter().position_embeddings(model, hidden))
    method = get_method("qllm").from_options({"epochs": 2, "blocks_per_job": 2, "rank": 2, "grid_steps": 10})
    result = method.quantize(model, W4A4, tiny_tokens, QuantContext(progress=False))
    linears = dict(quant_linears(model))
    assert len(linears) == 14 and all(m.frozen for m in linears.values())
    for name, linear in linears.items():
        assert linear.in_features == linear.weight.shape[1] == widths[name.replace(".module", "")]
    sites = result.stats["jobs"][0]["sites"]
    assert len(sites) == 6 and all(s["error_after"] <= s["error_before"] for s in sites)
    for s in sites[:3]:  # block 0: the statistic comes from the FP pass, not the quantized one
        assert s["layer"] == 0 and s["max_stat"] == pytest.approx(channel_max(feats[s["site"]]).max().item(), rel=1e-5)
    assert result.stats["reassembled_sites"] > 0  # the planted outliers get reassembled
    assert model.lm_head.bias is not None  # the tuned final-norm bias, folded into the FP head
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged: no extra parameters
    with torch.no_grad():
        assert torch.isfinite(model(tiny_tokens).logits).all()


@pytest.mark.smollm2
def test_smollm2_w4a4_beats_rtn(w4a4_ppl):
    """Demo settings (coarse theta grid, 1 epoch); the runs are shared via tests/methods/conftest.py."""
    qllm, rtn = w4a4_ppl("qllm"), w4a4_ppl("rtn")
    assert qllm < rtn, f"qllm {qllm:.2f} vs rtn {rtn:.2f}"
