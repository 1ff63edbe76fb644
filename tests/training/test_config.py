"""The config tree (t2po/config.py): defaults, presets and their `base:`, dotted overrides, errors
that name the fix, renamed keys, run folders read back, choice lists from the registries, and
`Config.resolved_rollout()`. (Every shipped preset loading and training: test_presets.py; an
unregistered algorithm or environment name: test_registries.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from t2po.algos import ALGORITHMS, Advantages, register_algorithm
from t2po.config import Config, ConfigError, config_from_dict, load_config, load_run_config
from t2po.engines import ENGINES, EngineSpec


def test_defaults_are_the_specs_and_a_dict_round_trip_keeps_them():
    cfg = config_from_dict({})
    assert cfg == Config()
    r = cfg.rollout
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) == (1.0, 1.0, 0)  # docs/method.md §6: training
    # docs/method.md §6: validation
    assert (r.val_sampling.temperature, r.val_sampling.top_p, r.val_sampling.top_k) == (0.6, 0.95, 20)
    # left to the algorithm
    assert r.tti.enabled is None and r.tds.enabled is None and r.val_sampling.max_new_tokens is None
    assert (r.tds.eta, r.tti.turn_score_skip, cfg.algo.name) == (0.3, 32, "t2po")
    # what a run folder stores (to_dict) reads back to the same config, for a preset far from the defaults
    preset = load_config("alfworld-cpu")
    assert preset != Config() and config_from_dict(preset.to_dict()) == preset
    assert "stop" not in preset.to_dict()["rollout"]["sampling"], "per-call fields of SamplingParams are no config keys"


def test_preset_base_inheritance(tmp_path):
    # a shipped preset: grpo.yaml is `base: default` plus algo.name
    assert load_config("grpo") == load_config("default", ["algo.name=grpo"])
    parent = tmp_path / "parent.yaml"
    parent.write_text("base: default\noptim:\n  lr: 0.5\nenv:\n  options:\n    max_steps: 7\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {parent}\nrollout:\n  group_size: 3\n  tds:\n    eta: 0.05\n")
    cfg = load_config(str(child))
    default = load_config("default")
    assert cfg.optim.lr == 0.5 and cfg.rollout.group_size == 3 and cfg.rollout.tds.eta == 0.05
    assert cfg.rollout.tds.max_try == default.rollout.tds.max_try == 1, "a nested section merges key by key"
    assert cfg.env.options == {**default.env.options, "max_steps": 7}, "env options merge with the base's"
    assert cfg.warmup == default.warmup
    # another environment: the base's Sokoban options do not apply to it
    other = tmp_path / "other.yaml"
    other.write_text("base: default\nenv:\n  name: blackjack\n  options:\n    observation_mode: text\n")
    assert load_config(str(other)).env.options == {"observation_mode": "text"}
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="circular base"):
        load_config(str(loop))
    with pytest.raises(ConfigError, match="Unknown preset 'defualt'.*did you mean 'default'"):
        load_config("defualt")


def test_dotted_overrides_reach_nested_sections():
    cfg = load_config("default",
            ["rollout.tti.patience=5", "rollout.tti.budget=450", "rollout.tds.eta=0.05", "rollout.tds.enabled=false",
                                  "rollout.sampling.top_k=5", "rollout.val_sampling.temperature=0",
                                  "rollout.vllm.max_model_len=512",
                                  "env.options.dim_room=[6,6]", "optim.lr=1e-5", "model.path=null",
                                  "trainer.trackers=[console]"])
    r = cfg.rollout
    assert (r.tti.patience, r.tti.budget, r.tds.eta, r.tds.enabled) == (5, 450, 0.05, False)
    assert (r.sampling.top_k, r.val_sampling.temperature, r.vllm.max_model_len) == (5, 0.0, 512)
    assert cfg.env.options["dim_room"] == [6,
                                           6] and cfg.env.options["num_boxes"] == 1, "one option set, the others kept"
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)  # YAML reads 1e-5 as a string
    assert cfg.model.path is None and cfg.trainer.trackers == ["console"]
    assert r.tti.alpha == Config().rollout.tti.alpha, "untouched keys of a section keep their value"
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("default", ["rollout.group_size"])


def test_config_typo_names_the_nearest_key():
    with pytest.raises(ConfigError, match="did you mean 'rollout.group_size'"):
        load_config("default", ["rollout.gruop_size=4"])
    with pytest.raises(ConfigError, match="did you mean 'grpo'"):
        load_config("default", ["algo.name=grpoo"])
    with pytest.raises(ConfigError, match="dim_room"):
        load_config("default", ["env.options.dim_rom=[5,5]"])


def test_unknown_nested_keys_name_the_nearest_valid_key():
    with pytest.raises(ConfigError,
                       match=r"Unknown config key 'rollout.tti.patiense' \(did you mean 'rollout.tti.patience'\?\)"):
        load_config("default", ["rollout.tti.patiense=5"])
    with pytest.raises(ConfigError, match="did you mean 'rollout.tds.max_try'"):
        load_config("default", ["rollout.tds.max_tries=3"])
    with pytest.raises(ConfigError, match="did you mean 'rollout.vllm.enforce_eager'"):
        load_config("default", ["rollout.vllm.enforce_eagre=true"])
    with pytest.raises(ConfigError,
                       match="rollout.vllm is a section; set its keys, e.g. rollout.vllm.gpu_memory_utilization="):
        load_config("default", ["rollout.vllm=3"])
    with pytest.raises(ConfigError, match="t2po train --help-config"):
        load_config("default", ["nosuch.key=1"])


@pytest.mark.parametrize("override,message", [
    ("rollout.group_size=2.5", r"rollout.group_size=2.5: expected an integer"),
    ("rollout.group_size=null", "rollout.group_size: null is not allowed"),
    ("model.lora=maybe", "model.lora='maybe': expected true or false"),
    ("rollout.tds.eta=abc", "rollout.tds.eta='abc': expected a number"),
    ("env.options=[1]", "env.options=.*expected a mapping"),
    ("rollout.group_size=0", "rollout.group_size=0: must be >= 1"),
    ("rollout.sampling.max_new_tokens=0", "rollout.sampling.max_new_tokens=0: must be >= 1"),
    ("rollout.val_sampling.top_p=0", "rollout.val_sampling.top_p=0.0: must be in \\(0, 1\\]"),
    ("rollout.tti.confidence=probability", "rollout.tti.confidence='probability': choose logprob or prob"),
    ("optim.lr=-1", "optim.lr=-1.0: must be > 0"),
    ("algo.gigpo_mode=mean", "algo.gigpo_mode='mean': choose"),
    ("trainer.trackers=[mlflwo]", "unknown tracker 'mlflwo' \\(did you mean 'mlflow'\\?\\)"),
])
def test_bad_values_fail_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])


def test_every_bad_value_is_named_in_one_error():
    with pytest.raises(ConfigError) as err:
        load_config("default",
                    ["optim.lr=-1", "rollout.num_tasks=0", "algo.dynamic_sampling=true", "rollout.tds.enabled=true"])
    text = str(err.value)
    assert text.startswith("Invalid configuration:")
    assert ("optim.lr" in text and "rollout.num_tasks" in text
            and "algo.dynamic_sampling and rollout.tds.enabled are alternatives" in text)


def test_renamed_flat_keys_are_read_with_their_new_names(capsys):
    old = load_config("default",
                      ["rollout.tds_eta=0.2", "rollout.temperature=0.7", "rollout.tti=false", "rollout.tti_budget=7",
                                  "rollout.val_top_k=5", "rollout.vllm_enforce_eager=true"])
    err = capsys.readouterr().err
    for old_key, new_key in [("rollout.tds_eta", "rollout.tds.eta"),
                             ("rollout.temperature", "rollout.sampling.temperature"),
                             ("rollout.tti", "rollout.tti.enabled"), ("rollout.tti_budget", "rollout.tti.budget"),
                             ("rollout.val_top_k", "rollout.val_sampling.top_k"),
                             ("rollout.vllm_enforce_eager", "rollout.vllm.enforce_eager")]:
        assert f"{old_key} -> {new_key}" in err
    new = load_config("default", ["rollout.tds.eta=0.2", "rollout.sampling.temperature=0.7",
                                  "rollout.tti.enabled=false", "rollout.tti.budget=7",
                                  "rollout.val_sampling.top_k=5", "rollout.vllm.enforce_eager=true"])
    assert old == new and old.rollout.tds.eta == 0.2 and old.rollout.tti.enabled is False
    assert capsys.readouterr().err == "", "new keys: no message"


def test_renamed_keys_in_a_preset_file(tmp_path, capsys):
    preset = tmp_path / "old.yaml"
    preset.write_text("base: default\nrollout:\n  tds_max_try: 3\n  max_new_tokens: 20\n")
    cfg = load_config(str(preset))
    assert cfg.rollout.tds.max_try == 3 and cfg.rollout.sampling.max_new_tokens == 20
    err = capsys.readouterr().err
    assert str(preset) in err and "rollout.tds_max_try -> rollout.tds.max_try" in err


def _run_folder(tmp_path, data: dict):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return run


def test_load_run_config_reads_a_run_folder(tmp_path):
    cfg = load_config("default", ["rollout.tti.budget=9", "algo.name=grpo", "env.options.dim_room=[6,6]"])
    run = _run_folder(tmp_path, cfg.to_dict())
    assert load_run_config(run) == cfg
    resumed = load_run_config(run, ["trainer.iterations=12"])
    assert resumed.trainer.iterations == 12 and resumed.rollout.tti.budget == 9
    with pytest.raises(FileNotFoundError, match="not a t2po run folder"):
        load_run_config(tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"(?s)config.yaml: .*rollout.group_size=0: must be >= 1"):
        load_run_config(run, ["rollout.group_size=0"])


def test_load_run_config_reads_an_old_style_config_yaml(tmp_path, capsys):
    """A run written before the keys were renamed (flat rollout.tti_*, tds_*, val_* keys) loads with
    the new names and the same values."""
    old = {"env": {"name": "sokoban", "options": {"dim_room": [5, 5]}},
           "rollout": {"max_new_tokens": 12, "temperature": 0.9, "tti": True, "tti_budget": 7,
                       "tti_patience": 3, "alpha": 0.5,
                       "tds": False, "tds_eta": 0.1, "val_temperature": 0.4, "val_top_p": 0.9,
                       "vllm_kv_cache_gib": 2.0}}
    cfg = load_run_config(_run_folder(tmp_path, old))
    r = cfg.rollout
    assert (r.sampling.max_new_tokens, r.sampling.temperature) == (12, 0.9)
    assert (r.tti.enabled, r.tti.budget, r.tti.patience, r.tti.alpha) == (True, 7, 3, 0.5)
    assert (r.tds.enabled, r.tds.eta) == (False, 0.1)
    assert (r.val_sampling.temperature, r.val_sampling.top_p, r.vllm.kv_cache_gib) == (0.4, 0.9, 2.0)
    err = capsys.readouterr().err
    assert "config.yaml uses renamed keys" in err and "rollout.tti_budget -> rollout.tti.budget" in err


def test_choice_lists_come_from_the_registries(monkeypatch):
    with pytest.raises(ConfigError, match="algo.name: unknown algorithm 'toy'"):
        load_config("default", ["algo.name=toy"])

    @register_algorithm("toy", tti=True)
    def toy(batch, settings):
        return Advantages(np.zeros(len(batch.rewards)))

    try:
        cfg = load_config("default", ["algo.name=toy"])
        assert cfg.algorithm is ALGORITHMS["toy"]
    finally:
        ALGORITHMS.pop("toy")
    with pytest.raises(ConfigError, match="rollout.engine: unknown engine 'toy_engine'; choose one of hf, vllm"):
        load_config("default", ["rollout.engine=toy_engine"])
    monkeypatch.setitem(ENGINES, "toy_engine",
                        EngineSpec("t2po.engines.hf:HFEngine", shares_policy_weights=True, reads_images=False))
    assert load_config("default", ["rollout.engine=toy_engine"]).rollout.engine == "toy_engine"


def test_resolved_rollout_fills_nulls_by_the_algorithm(monkeypatch):
    def resolved(*overrides):
        cfg = load_config("default", list(overrides))
        return cfg, cfg.resolved_rollout()

    cfg, r = resolved("algo.name=t2po")
    assert (r.tti.enabled, r.tds.enabled) == (True, True)
    assert cfg.rollout.tti.enabled is None and cfg.rollout.tds.enabled is None, "the config keeps its nulls"
    assert (r.val_sampling.max_new_tokens == cfg.rollout.sampling.max_new_tokens == 40
            and cfg.rollout.val_sampling.max_new_tokens is None)
    for baseline in ("gigpo", "grpo", "rloo", "ppo"):
        _, r = resolved(f"algo.name={baseline}")
        assert (r.tti.enabled, r.tds.enabled) == (False, False), baseline
    # explicit beats the algorithm's default
    _, r = resolved("algo.name=grpo", "rollout.tti.enabled=true", "rollout.tds.enabled=true")
    assert (r.tti.enabled, r.tds.enabled) == (True, True)
    _, r = resolved("algo.name=t2po", "rollout.tds.enabled=false", "rollout.val_sampling.max_new_tokens=64")
    assert (r.tti.enabled, r.tds.enabled, r.val_sampling.max_new_tokens) == (True, False, 64)
    _, r = resolved("algo.name=t2po", "algo.dynamic_sampling=true")  # DAPO's filter and TDS are alternatives
    assert r.tds.enabled is False and r.tti.enabled is True
    _, r = resolved("algo.name=t2po", "rollout.tds.eta=0.05", "rollout.tti.patience=4")
    assert r.tds.eta == 0.05 and r.tti.patience == 4, "the other settings pass through"
    monkeypatch.setitem(ALGORITHMS, "toy_tds", ALGORITHMS["grpo"].__class__(ALGORITHMS["grpo"].advantages, tds=True))
    _, r = resolved("algo.name=toy_tds")
    assert (r.tti.enabled, r.tds.enabled) == (False, True), "the registration's defaults, not a list of names"


def test_the_replaced_stagnation_key_says_what_replaced_it():
    with pytest.raises(ConfigError, match="rollout.tti.eps_rel no longer exists: .*rollout.tti.eps_floor"):
        load_config("default", ["rollout.tti.eps_rel=1.0"])
    # null meant the absolute eps (the paper's rule): so does eps_floor=null
    assert load_config("default", ["rollout.tti.eps_rel=null"]).rollout.tti.eps_floor is None
