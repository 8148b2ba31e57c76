"""The one configuration: ``params.yaml`` parsed into typed, validated sections (``load_params``)."""

from recsys.config.cron import kfp_cron
from recsys.config.loading import ConfigError, load_params, params_from_yaml_text, parse_params
from recsys.config.presets import SYNTHETIC_PRESETS, SyntheticSizes
from recsys.config.schema import (
    BundleConfig,
    DataConfig,
    DeployConfig,
    EvaluationConfig,
    ExportConfig,
    FeastConfig,
    FeaturesConfig,
    FeatureViewTTLs,
    GateConfig,
    IndexConfig,
    MovieLensSource,
    Params,
    PipelineConfig,
    Resources,
    RowCountBounds,
    ServingConfig,
    SyntheticSource,
    TrainingSetConfig,
    ValidationConfig,
)
from recsys.config.section import Section

__all__ = [
    "SYNTHETIC_PRESETS",
    "BundleConfig",
    "ConfigError",
    "DataConfig",
    "DeployConfig",
    "EvaluationConfig",
    "ExportConfig",
    "FeastConfig",
    "FeatureViewTTLs",
    "FeaturesConfig",
    "GateConfig",
    "IndexConfig",
    "MovieLensSource",
    "Params",
    "PipelineConfig",
    "Resources",
    "RowCountBounds",
    "Section",
    "ServingConfig",
    "SyntheticSizes",
    "SyntheticSource",
    "TrainingSetConfig",
    "ValidationConfig",
    "kfp_cron",
    "load_params",
    "params_from_yaml_text",
    "parse_params",
]
