"""The features task of a cluster run with ``features.engine: spark``: a KFP container component running
``python -m recsys.spark_application``, which creates the Spark Operator ``SparkApplication`` and waits for
it, as the train tasks drive a PyTorchJob with ``pipeline.training_nodes > 1``.

Why a container component and not the lightweight ``steps.features``: the command line *is* the launch
(a test reads it from the compiled pipeline), and the task needs its artifacts' URIs as well as paths:
``raw.uri`` is where the SparkApplication reads (the ingest task's upload), ``features.uri`` where it
stages its output, and ``features.path`` the local folder the tables are copied to, which KFP's launcher
uploads to ``features.uri`` after the command (recsys/spark_application.py says why it is copied). KFP's
launcher fills in these four placeholders (``inputs.parameters``, ``inputs.artifacts[].uri``,
``outputs.artifacts[].uri`` / ``.path``; a string parameter as it is) in backends 2.4.1 and 2.15.0 alike
(kubeflow/pipelines backend/src/v2/component/launcher_v2.go ``getPlaceholders``).
The settings the features step's own config does not carry (``pipeline.run_as_user``, ``promote.secret``,
``pipeline.image_pull_secrets``) are compile-time arguments, as they are for every task's pod.
run-local keeps ``steps.features``: there ``engine: spark`` runs Spark in local mode in the task.
"""

# no `from __future__ import annotations`: KFP reads the component's annotations as objects
from typing import Any

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from recsys.config import Params

MODULE = "recsys.spark_application"


def launches_spark(params: Params, scheduled: bool) -> bool:
    """Whether the features task drives a SparkApplication: a compiled (cluster) pipeline with
    ``features.engine: spark``; run-local (``scheduled`` False) computes in the task, as with ``local``."""
    return scheduled and params.features.engine == "spark"


def spark_features_component(params: Params) -> Any:
    """The ``features`` component (inputs ``config``, ``raw``; output ``features``) of the compiled
    pipeline: ``python -m recsys.spark_application --config ... --features-dir <output path>``."""
    cfg = params.pipeline
    fixed = ["--run-as-user", str(cfg.run_as_user), "--s3-secret", params.promote.secret]
    for secret in cfg.image_pull_secrets or []:
        fixed += ["--image-pull-secret", secret]

    @dsl.container_component
    def features(config: str, raw: Input[Dataset], features: Output[Dataset]):
        uris = ["--raw-uri", raw.uri, "--features-uri", features.uri, "--features-dir", features.path]
        return dsl.ContainerSpec(
            image=cfg.image, command=["python", "-m", MODULE], args=["--config", config, *uris, *fixed]
        )

    return features
