"""Config validation: every key is checked and errors name the key and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgdgeom.errors import ConfigError
from sgdgeom.experiments.config import config_hash, load_config, parse_config

BASE = {
    "name": "t",
    "data": {"name": "digits"},
    "model": {"name": "fc", "depth": 2},
    "optimizer": {"name": "sgd", "lr": 0.1},
    "train": {"epochs": 1},
}


def with_(section, **values):
    return {**BASE, section: {**BASE[section], **values}}


def test_every_shipped_config_is_valid():
    import yaml

    from sgdgeom.experiments.compare import load_comparison

    configs = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))
    assert configs
    from sgdgeom.experiments.geodesic import load_geodesic_config
    from sgdgeom.experiments.rbm import load_rbm_config
    from sgdgeom.experiments.steady_state import load_steady_state_config
    from sgdgeom.experiments.sweep import load_sweep

    for path in configs:
        if path.parent.name == "rbm":
            load_rbm_config(path)
        elif path.parent.name == "geodesic":
            load_geodesic_config(path)
        elif path.parent.name == "steady-state":
            load_steady_state_config(path)
        elif path.parent.name in ("sweeps", "replication"):
            assert load_sweep(path, "runs/unused").runs
        elif "variants" in yaml.safe_load(path.read_text()):
            load_comparison(path)
        else:
            load_config(path)


def test_metric_keys_only_with_diffusion_sgd():
    config = parse_config(
        with_("optimizer", name="diffusion-metric-sgd", eps="auto", inverse="exact")
    )
    assert config.optimizer.inverse == "exact"
    with pytest.raises(ConfigError, match=r"optimizer\.eps: unknown key; allowed: name, lr"):
        parse_config(with_("optimizer", eps=0.1, inverse="weak"))
    with pytest.raises(ConfigError, match=r"optimizer\.inverse"):
        parse_config(with_("optimizer", name="diffusion-metric-sgd", inverse="strong"))


def test_diffusion_sgd_combinations_that_cannot_work_are_refused():
    fused = with_("optimizer", name="diffusion-metric-sgd", fused="on")
    assert parse_config(fused).optimizer.fused
    with pytest.raises(ConfigError, match="a monitor reads it"):
        parse_config({**fused, "monitor": {"temperature": True}})
    with pytest.raises(ConfigError, match="this loss makes several of them"):
        parse_config({**fused, "loss": {"name": "pla", "layers": ["fc2"], "R": 0.1}})
    with pytest.raises(ConfigError, match=r"optimizer\.fused: unknown key"):
        parse_config(with_("optimizer", fused="on"))


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError, match=r"optimizer\.lrr: unknown key; allowed: name, lr, "):
        parse_config(with_("optimizer", lrr=0.1))
    with pytest.raises(ConfigError, match=r"\(top level\)|optimiser: unknown key"):
        parse_config({**BASE, "optimiser": {}})


def test_unknown_model_option_lists_options():
    with pytest.raises(
        ConfigError,
        match="unknown key 'channels' for model 'fc'; allowed: name, "
        "init, depth, width, activation",
    ):
        parse_config(with_("model", channels=3))


def test_bad_values_name_the_choices():
    with pytest.raises(
        ConfigError,
        match=r"optimizer: unknown optimizer 'lbfgs'; known: sgd, adam, adamw, sam, asam, "
        r"entropy-sgd, lion, diffusion-metric-sgd",
    ):
        parse_config(with_("optimizer", name="lbfgs"))
    with pytest.raises(ConfigError, match=r"optimizer\.lr: .*greater than 0"):
        parse_config(with_("optimizer", lr=-1))
    with pytest.raises(ConfigError, match=r"data\.name: unknown dataset 'foo'; allowed: digits"):
        parse_config(with_("data", name="foo"))
    with pytest.raises(ConfigError, match=r"train: missing key"):
        parse_config({k: v for k, v in BASE.items() if k != "train"})


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_hash_depends_on_content_only():
    assert config_hash(parse_config(BASE)) == config_hash(parse_config(dict(BASE)))
    assert config_hash(parse_config(BASE)) != config_hash(parse_config(with_("optimizer", lr=1)))


def test_antithetic_pairs_only_with_a_local_entropy_loss():
    pairs = {"loss": {"name": "pla", "layers": ["fc2"], "R": 0.1, "y": 2, "antithetic": True}}
    assert parse_config({**with_("optimizer", name="sgd"), **pairs}).loss.antithetic
    with pytest.raises(ConfigError, match=r"loss\.antithetic: unknown key; allowed: name"):
        parse_config({**with_("optimizer", name="sgd"), "loss": {"antithetic": True}})
