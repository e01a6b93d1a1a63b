"""Zero-shot evaluation through lm-eval: task data offline, the Brown tasks on smollm2, name checks."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from harness import BitSpec, freeze, quantize_linears
from harness.errors import ConfigError
from harness.evaluation.zeroshot import _datasets_env, datasets_cache, zeroshot
from harness.evaluation.zeroshot import ZeroShotConfig
from harness.run.config import parse_config

FIXTURES = Path(__file__).parent / "zeroshot_data"
STANDARD = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")
# The metric each task is compared on, pinned here as literals (not read from the code's table): the
# papers' FP16 rows match acc_norm for HellaSwag and acc for the others; the HellaSwag-like Brown task
# follows HellaSwag.
COMPARED = {"hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc", "arc_challenge": "acc", "winogrande": "acc",
            "brown_nextsent": "acc_norm", "brown_cloze": "acc"}
CHANCE = 0.25
BROWN_LIMIT = 60  # items per Brown task in the smollm2 tests (cost: ~4 forward passes of ~100 tokens each)


def _records(task: str, split: str) -> int:
    return len((FIXTURES / task / f"{split}.jsonl").read_text().splitlines())


def test_standard_tasks_run_offline_on_local_data(tmp_path, monkeypatch, smollm2_tokenizer):
    from harness.models import tiny_llama

    tiny_model = tiny_llama(seed=0)  # smollm2's vocabulary (the shared fixture's is cut to 256 tokens)
    monkeypatch.setenv("PTQBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    cfg = ZeroShotConfig(tasks=STANDARD, task_data=str(data), batch_size=4)
    result = zeroshot(tiny_model, smollm2_tokenizer, cfg, device=torch.device("cpu"))
    tasks = result["tasks"]
    assert set(tasks) == set(STANDARD)
    scored = {"piqa": "validation", "arc_easy": "test", "arc_challenge": "test", "hellaswag": "validation",
              "winogrande": "validation"}
    for task, split in scored.items():
        entry = tasks[task]
        assert entry["split"] == split
        assert entry["samples"] == _records(task, split)  # every hand-written record was scored
        assert entry["data"]["files"][split] == str(data / task / f"{split}.jsonl")
        assert 0.0 <= entry["acc"] <= 1.0 and entry["version"] is not None
        assert ("acc_norm" in entry) == (task != "winogrande")  # winogrande defines acc only
        assert entry["metric"] == COMPARED[task]
    assert result["average"] == pytest.approx(sum(e[COMPARED[t]] for t, e in tasks.items()) / 5)
    assert result["num_fewshot"] == 0 and result["limit"] is None and result["lm_eval_version"]
    # A second call from the same folder with other tasks and a limit sees exactly those.
    again = zeroshot(tiny_model, smollm2_tokenizer, ZeroShotConfig(tasks=("winogrande",), task_data=str(data), limit=2),
                     device=torch.device("cpu"))
    assert list(again["tasks"]) == ["winogrande"] and again["tasks"]["winogrande"]["samples"] == 2 and again["limit"] == 2
    # What datasets converted went to our cache, not the user's home.
    assert datasets_cache() == tmp_path / "home" / "hf-datasets"
    assert any(datasets_cache().iterdir())


def test_offline_switch_is_restored():
    import datasets
    import huggingface_hub.constants as hub

    before = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"),
              datasets.config.HF_DATASETS_CACHE)
    with _datasets_env(offline=True):
        assert datasets.config.HF_HUB_OFFLINE and hub.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
        assert datasets.config.HF_DATASETS_CACHE == datasets_cache()
    assert (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"),
            datasets.config.HF_DATASETS_CACHE) == before


# --- task names ------------------------------------------------------------------------------------
def _sweep(**zeroshot_options) -> dict:
    return {"models": ["tiny-random-llama"], "methods": ["rtn"], "bits": ["W8A8"],
            "evaluation": {"zeroshot": zeroshot_options}}


def test_unknown_task_name_is_one_clear_error():
    with pytest.raises(ConfigError) as err:
        parse_config(_sweep(tasks=["brown_cloze", "piqaa"]))
    message = str(err.value)
    assert message.startswith("evaluation.zeroshot.tasks[1]: unknown task 'piqaa' (did you mean 'piqa'?)")
    assert "lm-eval ls tasks" in message and "brown_nextsent" in message and "\n" not in message


def test_unknown_task_name_on_the_command_line(tmp_path):
    from harness.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_sweep(tasks=["hellaswagg"])))
    result = CliRunner().invoke(main, ["run", str(config), "--dry-run"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "unknown task 'hellaswagg' (did you mean 'hellaswag'?)" in lines[0]


def test_task_data_flag_is_checked_before_any_run(tmp_path):
    from harness.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_sweep(tasks=["piqa"])))
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    result = CliRunner().invoke(main, ["run", str(config), "--dry-run", "--task-data", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert "evaluation.zeroshot.task_data: task 'piqa' is scored on its 'validation' split" in result.output


@pytest.mark.parametrize("options, field", [({"limit": 0}, "limit"), ({"batch_size": 0}, "batch_size"),
                                            ({"num_fewshot": -1}, "num_fewshot"), ({"tasks": ["brown_cloze"] * 2}, "tasks")])
def test_bad_options_name_their_field(options, field):
    with pytest.raises(ConfigError, match=rf"^evaluation\.zeroshot\.{field}: "):
        parse_config(_sweep(**options))


def test_runs_without_zeroshot_keep_their_keys():
    from harness.run.execute import plan

    plain = plan(parse_config(_sweep()))
    with_tasks = plan(parse_config(_sweep(tasks=["brown_cloze"])))
    assert "zeroshot" not in plain[0].identity()["evaluation"]
    assert {r.key for r in plain}.isdisjoint({r.key for r in with_tasks})


# --- the Brown tasks on the real model -------------------------------------------------------------
@pytest.fixture(scope="module")
def brown_cfg() -> ZeroShotConfig:
    return ZeroShotConfig(tasks=("brown_nextsent", "brown_cloze"), limit=BROWN_LIMIT, batch_size=8)


@pytest.fixture(scope="module")
def fp_result(_smollm2_loaded, brown_cfg):
    return zeroshot(copy.deepcopy(_smollm2_loaded.model), _smollm2_loaded.tokenizer, brown_cfg, device=torch.device("cpu"))


@pytest.mark.smollm2
@pytest.mark.parametrize("task", ["brown_nextsent", "brown_cloze"])
def test_fp_smollm2_beats_chance_on_brown_tasks(fp_result, task):
    entry = fp_result["tasks"][task]
    assert entry["samples"] == BROWN_LIMIT and entry["metric"] == COMPARED[task]
    assert fp_result["average"] == pytest.approx(sum(e[COMPARED[t]] for t, e in fp_result["tasks"].items()) / 2)
    # Chance is 25%; its standard error on 60 items is 5.6 points, so 40% is ~2.7 of them above.
    assert entry[entry["metric"]] > CHANCE + 0.15, json.dumps(entry)


@pytest.mark.smollm2
def test_w3a3_rtn_scores_lower_than_fp(_smollm2_loaded, brown_cfg, fp_result):
    model = copy.deepcopy(_smollm2_loaded.model)
    quantize_linears(model, BitSpec.parse("W3A3"))
    freeze(model)
    w3a3 = zeroshot(model, _smollm2_loaded.tokenizer, brown_cfg, device=torch.device("cpu"))
    assert w3a3["average"] < fp_result["average"] - 0.1, (w3a3["average"], fp_result["average"])


def test_report_shows_each_task_and_the_average_in_percent():
    from harness.report.frame import tidy_frame
    from tests.harness.records import record

    zs = {"average": 0.5, "tasks": {"hellaswag": {"acc": 0.3, "acc_norm": 0.4, "metric": "acc_norm"},
                                    "piqa": {"acc": 0.6, "acc_norm": 0.7, "metric": "acc"}}}
    row = tidy_frame([record("m", "fp", "W16A16", ppl={"brown": 20.0}, zeroshot=zs)]).iloc[0]
    assert row["hellaswag_acc_norm_pct"] == pytest.approx(40.0)
    assert row["piqa_acc_pct"] == pytest.approx(60.0)
    assert row["zeroshot_avg_pct"] == pytest.approx(50.0)



@pytest.mark.slow
def test_log_samples_writes_one_jsonl_line_per_item_and_keeps_the_run_key(tmp_path):
    from harness.run.execute import plan
    from harness.run.results import ResultStore
    from harness.run.sweep import run_sweep
    from tests.harness.run.executors.conftest import tiny_raw

    def sweep(log: bool):
        raw = tiny_raw(bits=["W8A8"])
        raw["evaluation"]["zeroshot"] = {"tasks": ["brown_cloze"], "limit": 3, "batch_size": 4, "log_samples": log}
        return parse_config(raw)

    assert [r.key for r in plan(sweep(True))] == [r.key for r in plan(sweep(False))]
    summary = run_sweep(sweep(True), tmp_path, progress=False)
    assert len(summary.done) == 2 and not summary.failed
    for key in summary.done:
        lines = (tmp_path / "samples" / key / "brown_cloze.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        record = ResultStore(tmp_path).read(tmp_path / "runs" / f"{key}.json")
        assert len(rows) == 3 == record.zeroshot_tasks["brown_cloze"]["samples"]
        # the per-item scores average to the stored accuracy
        assert sum(r["acc"] for r in rows) / 3 == pytest.approx(record.zeroshot_tasks["brown_cloze"]["acc"])
        assert "samples" not in json.loads((tmp_path / "runs" / f"{key}.json").read_text())
