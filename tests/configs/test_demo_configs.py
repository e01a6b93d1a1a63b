"""configs/demo.yaml shows every method at W4A4 in one seed; demo-full.yaml every bit spec; demo-seeds.yaml
repeats the demo's W4A4 methods over three seeds."""
from __future__ import annotations

from pathlib import Path

from harness.run.config import load_config
from harness.run.execute import plan

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_demo_is_one_seed_and_demo_seeds_three_at_w4a4():
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.run_seeds == (0,) and load_config(CONFIGS / "demo-full.yaml").run_seeds == (0,)
    w4a4 = {r.method for r in plan(demo) if r.bits.name == "W4A4"}
    assert w4a4 == {"rtn", "smoothquant", "omniquant", "qllm", "quarot"}  # every method in the demo's W4A4 column
    (quarot,) = [r for r in plan(demo) if r.method == "quarot"]
    assert quarot.bits.quantizes_attention  # Q/K/V quantized as for the other methods of the column
    seeds = load_config(CONFIGS / "demo-seeds.yaml")
    runs = plan(seeds)
    assert seeds.run_seeds == (0, 1, 2) and not seeds.evaluation.zeroshot.tasks
    assert sorted({(r.method, r.bits.name) for r in runs}) == [
        ("fp", "W16A16"), ("omniquant", "W4A4"), ("qllm", "W4A4"), ("quarot", "W4A4"), ("rtn", "W4A4"), ("smoothquant", "W4A4")]
    assert len(runs) == 3 * 4 + 2  # fp and rtn once: the seed cannot change them
    # every method keeps the demo's options and quant settings, so the two sweeps compare the same methods
    options = {e.name: (e.config, e.quant) for e in demo.methods}
    assert all((e.config, e.quant) == options[e.name] for e in seeds.methods)
