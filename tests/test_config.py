"""Dataclass configs from YAML: types checked at load, errors naming the key, overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from kpod.config import apply_overrides, from_dict, load_config, parse_override, to_dict
from kpod.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ConfigError(f"rate must be >= 0, got {self.rate}")


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    steps: int | None = None
    ids: tuple[int, ...] = ()
    path: Path | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_values_are_converted_and_checked():
    cfg = from_dict(Outer, {"steps": 3, "ids": [1, 2], "path": "a/b", "inner": {"rate": 2, "mode": "b"}})
    assert cfg == Outer(steps=3, ids=(1, 2), path=Path("a/b"), inner=Inner(rate=2.0, mode="b"))
    assert isinstance(cfg.inner.rate, float)
    assert from_dict(Outer, {"steps": None}).steps is None
    assert to_dict(cfg)["ids"] == [1, 2] and to_dict(cfg)["path"] == "a/b"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stpes": 1}, "unknown key 'stpes'; known keys: flag, ids, inner, name, path, steps"),
        ({"steps": "3"}, "steps: expected int or None"),
        ({"steps": True}, "steps: expected int or None"),
        ({"flag": "yes"}, "flag: expected true or false"),
        ({"ids": [1, "a"]}, "ids[1]: expected an integer"),
        ({"ids": 3}, "ids: expected a list of int"),
        ({"inner": {"rate": "fast"}}, "inner.rate: expected a number"),
        ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not allowed; choose one of: a, b"),
        ({"inner": {"rat": 1}}, "unknown key 'inner.rat'; known keys in inner: mode, rate"),
        ({"inner": {"rate": -1}}, "inner: rate must be >= 0"),
        ({"inner": 3}, "inner: expected a mapping of Inner settings"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert message in str(err.value)


def test_overrides_set_nested_keys_and_parse_yaml_values():
    assert parse_override("inner.rate=1e-3") == (["inner", "rate"], "1e-3")  # PyYAML's YAML 1.1
    assert from_dict(Inner, {"rate": "1e-3"}).rate == 1e-3  # ...so a float field accepts it
    assert parse_override("ids=[1, 2]") == (["ids"], [1, 2])
    data = apply_overrides({"inner": {"mode": "a"}}, ["inner.rate=2", "name=y"])
    assert data == {"inner": {"mode": "a", "rate": 2}, "name": "y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("nonsense")
    with pytest.raises(ConfigError, match="'name' is not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: z\ninner:\n  mode: b\n")
    assert load_config(Outer, path, ["steps=4"]) == Outer(name="z", steps=4, inner=Inner(mode="b"))
    path.write_text("inner:\n  mode: q\n")
    with pytest.raises(ConfigError, match=r"c.yaml: inner.mode: 'q' is not allowed"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(Outer, tmp_path / "missing.yaml")


def test_cli_options_come_from_the_config_dataclasses(capsys):
    """Every field of the step configs is an option of its subcommand, with the docstring's help,
    and options, --set and defaults reach the config the same way a YAML config does."""
    import argparse
    import dataclasses

    from kpod.cli import build_parser
    from kpod.config import config_from_args, field_docs
    from kpod.distill.trainer import TrainConfig
    from kpod.models import StudentConfig
    from kpod.pipeline import DifficultyConfig
    from kpod.progressive.schedule import ScheduleConfig
    from kpod.weighting.config import WeightingExperiments
    from kpod.weighting.train import WeightingConfig

    for cls in (
        WeightingConfig,
        WeightingExperiments,
        ScheduleConfig,
        DifficultyConfig,
        TrainConfig,
        StudentConfig,
    ):
        docs = field_docs(cls)
        assert {f.name for f in dataclasses.fields(cls)} <= set(docs), cls  # every field documented
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    wtrain = next(a for a in sub.choices["weights"]._actions if isinstance(a, argparse._SubParsersAction))
    wtrain = wtrain.choices["train"]
    by_dest = {a.dest: a for a in wtrain._actions}
    for f in dataclasses.fields(WeightingConfig):
        if f.name in ("rescale", "rescale_floor", "experimental"):
            assert f"weighting.{f.name}" not in by_dest  # read settings belong to the readers
            continue
        action = by_dest[f"weighting.{f.name}"]
        assert field_docs(WeightingConfig)[f.name].replace("%", "%%") in action.help
    for f in dataclasses.fields(WeightingExperiments):  # the sub-section's options, names unprefixed
        action = by_dest[f"weighting.experimental.{f.name}"]
        assert field_docs(WeightingExperiments)[f.name].replace("%", "%%") in action.help
        assert "weighting.experimental." + f.name + " in a config" in action.help
    assert "--prefixes" in by_dest["weighting.experimental.n_prefixes"].option_strings  # the old name works
    args = parser.parse_args(
        ["weights", "train", "d.jsonl", "--out", "w", "--prefixes", "3", "--no-normalize-mask-loss"]
        + ["--estimator", "straight-through", "--tau-final", "null", "--set", "weighting.alpha=0.7"]
    )
    from kpod.cli import _config_sections

    config = config_from_args(
        WeightingConfig, args, "weighting", _config_sections(args, "weighting")["weighting"]
    )
    assert config == WeightingConfig.from_settings(
        dict(n_prefixes=3, normalize_mask_loss=False, estimator="straight-through", alpha=0.7)
    )
    assert config.experimental.n_prefixes == 3 and config.experimental.tau_final is None
    args = parser.parse_args(["weights", "train", "d.jsonl", "--out", "w", "--target-keep", "null"])
    assert config_from_args(WeightingConfig, args, "weighting").target_keep is None  # null overrides 0.5
    args = parser.parse_args(["distill", "d.jsonl", "--out", "o", "--lr", "1e-3", "--student", "m"])
    assert config_from_args(TrainConfig, args, "train", {"epochs": 2}) == TrainConfig(lr=1e-3, epochs=2)
    assert config_from_args(StudentConfig, args, "student").name == "m"
    args = parser.parse_args(["schedule", "plan", "d.jsonl", "--out", "o", "--c0", "0.2", "--clusters", "3"])
    schedule = config_from_args(ScheduleConfig, args, "schedule")
    assert (schedule.initial_fraction, schedule.n_clusters, schedule.p) == (0.2, 3, ScheduleConfig().p)
    with pytest.raises(SystemExit):  # a Literal's choices are enforced by argparse
        parser.parse_args(["weights", "train", "d.jsonl", "--out", "w", "--optimizer", "lion"])
    # A number or a word (eval_batch_size: int | "auto"): either is read, anything else refused.
    for given, expected in (("auto", "auto"), ("48", 48)):
        args = parser.parse_args(["distill", "d.jsonl", "--out", "o", "--eval-batch-size", given])
        assert config_from_args(TrainConfig, args, "train").eval_batch_size == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "d.jsonl", "--out", "o", "--eval-batch-size", "many"])
    assert TrainConfig().eval_batch_size == "auto"
    with pytest.raises(ConfigError, match="train.eval_batch_size: expected int or 'auto', got 'many'"):
        from_dict(TrainConfig, {"eval_batch_size": "many"}, "train")
    with pytest.raises(ConfigError, match="eval_batch_size must be at least 1 or auto"):
        TrainConfig(eval_batch_size=0)
    assert TrainConfig().micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="micro_batch_size must be at least 1 or auto"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(ConfigError, match="train.micro_batch_size: expected int or 'auto', got 'half'"):
        from_dict(TrainConfig, {"micro_batch_size": "half"}, "train")
    capsys.readouterr()


def test_weighting_experiment_knobs_live_in_their_own_section():
    from kpod.pipeline import pipeline_config
    from kpod.weighting.config import WeightingConfig, WeightingExperiments

    config = pipeline_config({"weighting": {"alpha": 0.7, "experimental": {"tau": 0.5, "prefix_sum": True}}})
    assert config.weighting.alpha == 0.7
    assert config.weighting.experimental == WeightingExperiments(tau=0.5, prefix_sum=True)
    with pytest.raises(ConfigError, match="'weighting.tau' is now 'weighting.experimental.tau'"):
        pipeline_config({"weighting": {"tau": 0.5}})
    with pytest.raises(ConfigError, match="weighting.experimental.samples.*expected an integer"):
        pipeline_config({"weighting": {"experimental": {"samples": "many"}}})
    with pytest.raises(ConfigError, match="samples >= 2"):
        pipeline_config({"weighting": {"experimental": {"samples": 1}}})
    # The weights step's cache key stays flat, so run directories made before the section existed
    # still match: the experimental knobs sit beside the others and the read settings are left out.
    settings = config.weighting.training_settings()
    assert settings["tau"] == 0.5 and settings["prefix_sum"] is True and settings["alpha"] == 0.7
    assert "experimental" not in settings and "rescale" not in settings
    before = """student predictor predictor_mode alpha normalize_mask_loss kept_budget target_keep estimator
        samples tau tau_final n_prefixes prefix_sum epochs max_steps batch_size lr predictor_lr optimizer
        max_rationale_tokens precision num_heads mlp_hidden seed device"""  # the flat config's fields
    assert set(settings) == set(before.split())
    # A weights directory's config.json, flat (older) or nested (newer), reads back the same.
    assert WeightingConfig.from_settings(config.weighting.settings()) == config.weighting
    nested = to_dict(config.weighting)
    assert nested["experimental"]["tau"] == 0.5
    assert WeightingConfig.from_settings(nested) == config.weighting
