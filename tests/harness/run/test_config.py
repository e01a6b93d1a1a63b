from __future__ import annotations

import pytest
import yaml

from harness.errors import ConfigError
from harness.run.config import load_config, parse_config

GOOD = {
    "name": "t", "models": ["tiny-random-llama"], "methods": ["rtn", {"name": "clipped-rtn", "clip_ratio": 0.8, "bits": ["W4A16"]}],
    "bits": ["W8A8", "W4A4"], "calibration": {"dataset": "brown", "samples": 2, "seqlen": 64},
    "evaluation": {"ppl": {"datasets": ["brown"], "seqlen": 64, "max_windows": 2}},
}


def with_(path: str, value):
    """GOOD with one field (dotted path, list indices as ints) replaced."""
    import copy

    data = copy.deepcopy(GOOD)
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    node[int(last) if last.isdigit() else last] = value
    return data


def test_good_config_parses_and_round_trips():
    config = parse_config(GOOD)
    entry = config.methods[1]
    assert entry.config.clip_ratio == 0.8 and [b.name for b in entry.bits] == ["W4A16"]  # typed, parsed once
    assert parse_config(config.to_dict()) == config
    assert parse_config(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config  # what runs store as config.yaml


def test_overrides_parse_typed_and_round_trip():
    config = parse_config({**GOOD, "overrides": [{"bits": ["W4A16"], "methods": {"clipped-rtn": {"clip_ratio": 0.5}}}]})
    (override,) = config.overrides
    assert [b.name for b in override.bits] == ["W4A16"] and override.methods == {"clipped-rtn": {"clip_ratio": 0.5}}
    assert parse_config(config.to_dict()) == config
    assert parse_config(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


@pytest.mark.parametrize("path, value, field", [
    ("bits", ["W4Z4"], "bits"),
    ("bits.0", "W1A1", "bits"),
    ("models", [], "models"),
    ("methods.0", "rnt", "methods[0].name"),
    ("methods.1.clip_ratio", 2.0, "methods[1].clip_ratio"),
    ("methods.1.clip_ration", 0.5, "methods[1].clip_ration"),
    ("calibration.samples", 0, "calibration.samples"),
    ("calibration.samples", "many", "calibration.samples"),
    ("calibration.dataset", "browm", "calibration.dataset"),
    ("evaluation.ppl.datasets", ["nope.txt"], "evaluation.ppl.datasets[0]"),
    ("evaluation.ppl.seqlenn", 64, "evaluation.ppl.seqlenn"),
    ("device", "tpu", "device"),
    ("seed", 1.5, "seed"),
    ("quant", {"weight_granularity": "row"}, "quant.weight_granularity"),
    ("quant", {"attention": "yes"}, "quant.attention"),
    ("overrides", {"models": []}, "overrides"),
    ("overrides", [{"models": ["llama-2-70b"], "methods": {"rtn": {}}}], "overrides[0].models[0]"),
    ("overrides", [{"bits": ["W3A3"], "methods": {"rtn": {}}}], "overrides[0].bits[0]"),
    ("overrides", [{"bits": ["W4Z4"], "methods": {"rtn": {}}}], "overrides[0].bits[0]"),
    ("overrides", [{"methods": {"omniquant": {"alpha": 0.5}}}], "overrides[0].methods.omniquant"),
    ("overrides", [{"methods": {"clipped-rtn": {"clip_ration": 0.5}}}], "overrides[0].methods.clipped-rtn.clip_ration"),
    ("overrides", [{"methods": {"clipped-rtn": {"clip_ratio": 2.0}}}], "overrides[0].methods.clipped-rtn.clip_ratio"),
    ("overrides", [{"method": {"rtn": {}}}], "overrides[0].method"),
])
def test_each_bad_field_is_one_line_naming_it(path, value, field):
    with pytest.raises(ConfigError) as err:
        parse_config(with_(path, value))
    message = str(err.value)
    assert message.startswith(field) and "\n" not in message, message


def test_unknown_top_level_key_suggests():
    with pytest.raises(ConfigError, match="did you mean 'models'"):
        parse_config({**GOOD, "modles": ["x"]})


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(unsafe)  # safe_load refuses python tags
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    assert load_config(good).name == "t"


def test_shipped_configs_are_valid():
    from pathlib import Path

    paths = sorted(Path("configs").glob("**/*.yaml"))
    assert paths
    for path in paths:
        load_config(path)  # validation loads no model, so hub-only sweeps validate offline too


def test_seeds_list_and_single_seed():
    assert parse_config(GOOD).run_seeds == (0,)
    assert parse_config({**GOOD, "seed": 3}).run_seeds == (3,)
    config = parse_config({**GOOD, "seeds": [0, 1, 2]})
    assert config.run_seeds == (0, 1, 2) and parse_config(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^seeds: .*repeats"):
        parse_config({**GOOD, "seeds": [0, 1, 0]})
    with pytest.raises(ConfigError, match=r"^seeds\[1\]"):
        parse_config({**GOOD, "seeds": [0, "one"]})


QUAROT = {**GOOD, "models": ["tiny-random-llama"], "methods": ["rtn", {"name": "quarot", "weight_solver": "rtn"}],
          "bits": ["W4A4KV4"]}


def test_a_method_runs_with_its_quant_defaults_where_the_sweep_is_silent():
    config = parse_config(QUAROT)
    rtn, quarot = config.methods
    assert rtn.bits is None and rtn.quant is None and not config.bits[0].w_symmetric
    (spec,) = quarot.bits
    settings = (spec.w_symmetric, spec.a_symmetric, spec.kv_sym, spec.a_clip, spec.kv_clip, spec.full_grid)
    assert settings == (True, True, False, 0.9, 0.95, True)
    assert parse_config(config.to_dict()) == config


def test_the_sweeps_explicit_quant_keys_and_the_entrys_own_win_over_a_methods_defaults():
    config = parse_config({**QUAROT, "quant": {"act_clip_ratio": 1.0},
                           "methods": [{"name": "quarot", "weight_solver": "rtn", "quant": {"kv_clip_ratio": 1.0}}]})
    (spec,) = config.methods[0].bits
    assert (spec.a_clip, spec.kv_clip, spec.w_symmetric) == (1.0, 1.0, True)
    assert parse_config(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^methods\[0\]\.quant\.kv_clip_ratio: 2.0 is not allowed"):
        parse_config({**QUAROT, "methods": [{"name": "quarot", "quant": {"kv_clip_ratio": 2}}]})
    with pytest.raises(ConfigError, match=r"^methods\[0\]\.quant\.symmetric: unknown option"):
        parse_config({**QUAROT, "methods": [{"name": "quarot", "quant": {"symmetric": True}}]})
