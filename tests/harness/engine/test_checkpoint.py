"""Durable runs: a real ``ptqbench run`` killed with SIGKILL resumes from its block checkpoint and ends
with the same result as a run that was never interrupted (bit for bit on CPU, same seed)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.engine.checkpoint import Checkpoint, CheckpointError
from harness.models import tiny_llama
from harness.runtime import KILL_ENV

ROOT = Path(__file__).resolve().parents[3]


def sweep(tmp: Path, folder: Path, method: dict) -> Path:
    # isolate: false, so PTQBENCH_TEST_KILL_AT kills the `ptqbench run` process itself (kill -9 of a real run)
    config = {"name": "durable", "models": [str(folder)], "methods": [method], "bits": ["W4A8"], "device": "cpu",
              "executor": {"isolate": False},
              "dtype": "float32", "calibration": {"dataset": "brown", "samples": 4, "seqlen": 32},
              "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 32, "max_windows": 2}}}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill_at:
        env[KILL_ENV] = kill_at
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "harness.cli", "run", str(config), "--out", str(out), "--no-progress"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def result(out: Path, method: str) -> dict:
    records = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    (record,) = [r for r in records if r["method"] == method]
    return record


def without_timings(stats: object) -> object:
    """The stats with wall-clock fields dropped (they differ between any two runs)."""
    if isinstance(stats, dict):
        return {k: without_timings(v) for k, v in stats.items() if k not in ("seconds", "wall_s")}
    if isinstance(stats, list):
        return [without_timings(v) for v in stats]
    return stats


@pytest.mark.slow
@pytest.mark.parametrize("method,kill_at", [({"name": "omniquant", "epochs": 1}, "block:1"),
                                            ({"name": "qllm", "epochs": 1, "grid_steps": 4, "blocks_per_job": 2}, "mid:2"),
                                            ({"name": "spinquant", "steps": 2, "weight_solver": "rtn"}, "block:1")])
def test_killed_run_resumes_and_equals_an_uninterrupted_run(lazy_folder, tmp_path, method, kill_at):
    config = sweep(tmp_path, lazy_folder, method)
    reference = run(config, tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert not list((tmp_path / "reference" / "work").glob("*/blocks"))  # finished runs clean up

    killed = run(config, tmp_path / "resumed", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (work,) = [p for p in (tmp_path / "resumed" / "work").iterdir() if (p / "engine" / "state.json").exists()]
    done = json.loads((work / "engine" / "state.json").read_text())["next_start"]
    assert done == 2  # block:1 died after checkpointing blocks 0-1; mid:2 inside block 2, before writing it
    stored = [json.loads(p.read_text())["method"] for p in (tmp_path / "resumed" / "runs").glob("*.json")]
    assert method["name"] not in stored

    resumed = run(config, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from the checkpoint" in resumed.stderr
    if method["name"] == "spinquant":  # its blocks were rotated by the rotations it trained before the kill
        assert "not trained again" in resumed.stderr
    a, b = result(tmp_path / "reference", method["name"]), result(tmp_path / "resumed", method["name"])
    assert a["key"] == b["key"]
    assert a["metrics"] == b["metrics"]  # perplexities equal exactly, not approximately
    assert without_timings(a["stats"]) == without_timings(b["stats"])
    assert not work.exists()


class Evil:
    """Unpickling this would run a shell command: a structure file must never get that far."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


class Outsider(torch.nn.Module):
    """A module class from a package that is neither torch, transformers, harness nor a registered method's."""


@pytest.mark.parametrize("payload, named", [(Evil(), "system"), (Outsider(), "Outsider")])
def test_structure_files_admit_only_trusted_classes(tmp_path, payload, named):
    ckpt = Checkpoint(tmp_path / "engine", tmp_path / "blocks")
    (tmp_path / "blocks").mkdir()
    torch.save(payload, ckpt.structure_file(0))
    with pytest.raises(CheckpointError, match=named):
        ckpt.load_structure(0)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_structure_round_trip_of_a_quantized_block(tmp_path):
    # an independent check of what the kill tests rely on: a QuantLinear block comes back with its spec
    from harness import BitSpec, QuantContext, get_method

    model = tiny_llama(0, vocab_size=256)
    spec = BitSpec.parse("W4A4")
    context = QuantContext(device=torch.device("cpu"), seed=0, progress=False)
    layer = get_method("rtn").from_options({}).quantize(model, spec, None, context).model.model.layers[0].to("meta")
    ckpt = Checkpoint(tmp_path / "engine", tmp_path / "blocks")
    (tmp_path / "blocks").mkdir()
    ckpt.save_structure(0, layer)
    back = ckpt.load_structure(0)
    assert type(back.self_attn.q_proj).__name__ == "QuantLinear" and back.self_attn.q_proj.spec == layer.self_attn.q_proj.spec
    assert [n for n, _ in back.named_modules()] == [n for n, _ in layer.named_modules()]


def saved_checkpoint(tmp_path: Path, key: str = "k1") -> Checkpoint:
    """A checkpoint of two finished blocks (real files: safetensors blocks, pickled structures) and its state."""
    from safetensors.torch import save_file

    from harness.engine.checkpoint import EngineState

    blocks = tmp_path / "blocks"
    blocks.mkdir()
    ckpt = Checkpoint(tmp_path / "engine", blocks, key=key)
    for i in range(2):
        save_file({"w": torch.full((4, 4), float(i))}, ckpt.block_file(i))
        ckpt.save_structure(i, torch.nn.Linear(4, 4).to("meta"))
    x = torch.randn(2, 3, 4)
    ckpt.save(EngineState(2, x, x + 1, [{"block": 0}], {"last": x * 2}, torch.get_rng_state()), finished=range(2))
    return ckpt


def test_a_sound_checkpoint_is_resumed_with_its_tensors(tmp_path):
    saved = saved_checkpoint(tmp_path)
    state = Checkpoint(saved.folder, saved.blocks_dir, key="k1").load()
    assert state is not None and state.next_start == 2 and state.stats == [{"block": 0}]
    assert torch.equal(state.q_x, state.fp_x + 1) and torch.equal(state.state["last"], state.fp_x * 2)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def rewrite_with_other_shape(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2, 8)}, path)  # same byte count, another header


@pytest.mark.parametrize("damage, why", [
    (lambda c: c.block_file(1).unlink(), "block 1: blocks/block_0001.safetensors is missing"),
    (lambda c: c.structure_file(0).unlink(), "block 0: blocks/block_0000.structure.pt is missing"),
    (lambda c: truncate(c.block_file(0)), "block 0: blocks/block_0000.safetensors has"),
    (lambda c: rewrite_with_other_shape(c.block_file(1)), "block 1: blocks/block_0001.safetensors differs from the file"),
    (lambda c: torch.save(torch.nn.Linear(4, 3).to("meta"), c.structure_file(1)), "block 1: blocks/block_0001.structure.pt"),
    (lambda c: next(c.folder.glob("state_*.safetensors")).unlink(), "engine/state_0002.safetensors is missing"),
    (lambda c: (c.folder / "state.json").write_text("{"), "state.json is unreadable"),
    (lambda c: (c.folder / "state.json").write_text(json.dumps({"next_start": 2, "file": "state_0002.safetensors", "stats": []})),
     "manifest version 1"),
])
def test_a_damaged_checkpoint_is_named_in_one_line_and_not_resumed(tmp_path, caplog, damage, why):
    saved = saved_checkpoint(tmp_path)
    damage(saved)
    ckpt = Checkpoint(saved.folder, saved.blocks_dir, key="k1")
    assert why in ckpt.problem()
    with caplog.at_level("WARNING"):
        assert ckpt.load() is None
    (line,) = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert why in line and "starts from block 0" in line and "\n" not in line
    assert not (saved.folder / "state.json").exists() and not list(saved.folder.glob("state_*"))  # forgotten


def test_a_checkpoint_of_another_run_key_is_not_resumed(tmp_path):
    saved = saved_checkpoint(tmp_path, key="k1")
    assert Checkpoint(saved.folder, saved.blocks_dir, key="k2").problem() == "state.json belongs to run k1, not k2"


def test_a_resume_with_another_thread_count_is_said_in_the_log(tmp_path, caplog):
    threads = torch.get_num_threads()
    saved = saved_checkpoint(tmp_path)
    assert json.loads((saved.folder / "state.json").read_text())["torch_threads"] == threads
    with caplog.at_level("WARNING"):
        Checkpoint(saved.folder, saved.blocks_dir, key="k1").load()
        assert not [r for r in caplog.records if "torch threads" in r.getMessage()]
        torch.set_num_threads(threads + 1)
        try:
            assert Checkpoint(saved.folder, saved.blocks_dir, key="k1").load() is not None  # resumed all the same
        finally:
            torch.set_num_threads(threads)
    (line,) = [r.getMessage() for r in caplog.records if "torch threads" in r.getMessage()]
    assert f"ran with {threads} torch threads, the rest runs with {threads + 1}" in line


def test_a_run_without_calibration_data_checkpoints_no_activations_and_resumes(lazy_folder, tmp_path):
    """tokens=None on a lazy model: each group's checkpoint holds the RNG and the method's state only; a run stopped
    in block 2 continues there and ends with the blocks an uninterrupted run writes."""
    from safetensors.torch import load_file

    from harness import BitSpec, freeze, quantize_block
    from harness.engine.blockwise import run_blockwise
    from harness.engine.hooks import BlockHooks
    from harness.models import load_model
    from harness.models.lazy import block_store, materialize_all

    def run(work: Path, stop_at: int | None = None) -> dict[str, torch.Tensor]:
        model = load_model(str(lazy_folder), dtype="float32", device="cpu", lazy=True).model
        block_store(model).set_work_dir(work / "blocks", key="k")

        def solve(job):
            if job.index == stop_at:
                raise RuntimeError("stopped")
            for layer in job.layers:
                quantize_block(layer, BitSpec.parse("W4A16"), job.adapter)
                freeze(layer)
            return {"done": job.index}

        hooks = BlockHooks(solve=solve, state={"count": torch.tensor([1.0])})
        run_blockwise(model, None, hooks, device=torch.device("cpu"), progress=False)
        return materialize_all(model).state_dict()

    with pytest.raises(RuntimeError, match="stopped"):
        run(tmp_path / "resumed", stop_at=2)
    manifest = json.loads((tmp_path / "resumed" / "engine" / "state.json").read_text())
    assert manifest["next_start"] == 2 and manifest["stats"] == [{"block": 0, "done": 0}, {"block": 1, "done": 1}]
    assert set(load_file(tmp_path / "resumed" / "engine" / manifest["file"])) == {"rng", "state.count"}
    resumed, reference = run(tmp_path / "resumed"), run(tmp_path / "reference")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in resumed)
