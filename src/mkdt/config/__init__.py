"""Typed configuration: the schema (:mod:`mkdt.config.schema`, every key with its default, help
and checks) and loading (:mod:`mkdt.config.loading`: presets, YAML files, overrides)."""

from mkdt.config.loading import (
    config_from_dict,
    config_to_dict,
    dump_config,
    iter_fields,
    load_config,
    preset_description,
    preset_names,
)
from mkdt.config.schema import (
    Config,
    DataConfig,
    DistillConfig,
    EvaluateConfig,
    ExpertsConfig,
    InitConfig,
    KRRSTConfig,
    ModelConfig,
    TargetsConfig,
    TeacherConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvaluateConfig",
    "ExpertsConfig",
    "InitConfig",
    "KRRSTConfig",
    "ModelConfig",
    "TargetsConfig",
    "TeacherConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "iter_fields",
    "load_config",
    "preset_description",
    "preset_names",
]
