"""One source of truth for the pipeline's UI parameters: the config keys declared
`setting(parameter=...)`. The DAG's signature and the data prep adapter's must list exactly those,
with the declared types (the key's, or its `parameter_type`) and the preset's values as defaults; the
task refuses any difference."""

import inspect
import typing

import pytest
from kfp import dsl

from components.prepare_data import prepare_data
from funmatch import config
from funmatch.errors import ConfigError
from funmatch.launch import tasks
from pipelines.funmatch_pipeline import build

DAG_ONLY = {"config_json", "checkpoint_root", "publish_uri"}  # DAG inputs that are not config keys


def test_parameters_are_declared_on_keys_that_exist():
    declared = config.pipeline_parameters()
    assert len(declared) == 15 and set(declared.values()) <= set(config.all_keys())
    assert declared["accelerator_count"] == "resources.accelerator_count"


def test_the_gpu_count_is_a_string_parameter_of_an_integer_key():
    """A resource field fed by a NUMBER parameter resolves to "" in the KFP driver (the GPU limit is dropped;
    tests/pipelines/test_backend_contract.py), so the count's parameter is declared STRING on its int key."""
    assert config.all_keys()["resources.accelerator_count"] is int
    assert config.pipeline_parameter_types()["accelerator_count"] is str
    assert config.pipeline_defaults(config.load("imagenet"))["accelerator_count"] == "1"
    cfg = config.load("pets-fast")
    resolved = tasks.resolve_config(cfg.to_json(), config.pipeline_defaults(cfg) | {"accelerator_count": "2"})
    assert resolved.resources.accelerator_count == 2  # back to the key's type


@pytest.mark.parametrize("preset", ["demo", "imagenet"])
def test_dag_signature_equals_the_declaration(preset):
    cfg = config.load(preset)
    signature = inspect.signature(build(cfg).pipeline_func)
    ui = {n: p for n, p in signature.parameters.items() if n not in DAG_ONLY}
    types, defaults = config.pipeline_parameter_types(), config.pipeline_defaults(cfg)
    assert list(ui) == list(config.pipeline_parameters())  # same names, same order
    for name in config.pipeline_parameters():
        assert ui[name].annotation in (types[name], types[name].__name__), name
        assert ui[name].default == defaults[name] and type(ui[name].default) is types[name], name  # the preset's


def test_prepare_data_adapter_takes_exactly_the_declared_parameters():
    hints = typing.get_type_hints(prepare_data.python_func)
    inputs = {n: t for n, t in hints.items() if n not in ("config_json", "dataset", "return")}
    assert inputs == config.pipeline_parameter_types()


def test_a_missing_or_unknown_parameter_is_refused_in_one_line(tmp_path):
    cfg = config.load("demo-tiny")
    ui = {name: config.get(cfg, key) for name, key in config.pipeline_parameters().items()}
    dataset = dsl.Dataset(name="d", uri=str(tmp_path / "d"), metadata={})
    with pytest.raises(ConfigError, match=r"missing \['distill_lr'\], unknown \[\]"):
        tasks.prepare_data(cfg.to_json(), {k: v for k, v in ui.items() if k != "distill_lr"}, dataset)
    with pytest.raises(ConfigError, match=r"missing \[\], unknown \['distill_lrr'\]"):
        tasks.prepare_data(cfg.to_json(), ui | {"distill_lrr": 0.1}, dataset)
    assert not (tmp_path / "d").exists()  # refused before any work
