"""Shared fixtures: a prepared demo dataset and a tiny teacher, built once per test session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download in tests

import pytest

from funmatch import config
from funmatch.stages import finetune, prepare


@pytest.fixture(scope="session")
def tiny_cfg() -> config.Config:
    return config.load("demo-tiny")


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, tiny_cfg):
    out = tmp_path_factory.mktemp("dataset")
    prepare.run(tiny_cfg, out)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tiny_cfg, dataset_dir):
    out = tmp_path_factory.mktemp("teacher") / "teacher"
    finetune.run(tiny_cfg, dataset_dir, out)
    return out
