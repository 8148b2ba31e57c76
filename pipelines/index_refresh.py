"""The ``recsys-index-refresh`` Kubeflow pipeline: new catalogue items join the served index, hourly.

```
configure (window: hour) -> ingest -> features -> index-refresh (grow the promoted bundle, promote it)
```

Training runs daily; an item created after it would wait up to a day to be retrievable. This short
pipeline (``pipeline.index_refresh``: its own name and cron) reads the data up to its scheduled hour, has
the promoted bundle's own item tower embed the catalogue items the bundle lacks, adds them to a copy of its
index and promotes that as a new version, on the condition that the version it grew from is still
current (a training run that promoted in between wins). Servers with ``serving.index_swap`` poll the
promote store and swap the index in without a restart (serving/index_swap.py). No GPU, no Feast store: the
catalogue comes from the run's own feature tables. Same images, resources, namespace, experiment and
service account as the training pipeline; compiled to pipelines/recsys_index_refresh.yaml.
"""

# no `from __future__ import annotations`: KFP reads the pipeline's parameter annotations as objects
from typing import Any

from kfp import dsl

from pipelines import steps
from pipelines.recsys_training import configured_task, params_as_text, with_object_store
from pipelines.spark_task import launches_spark, spark_features_component
from recsys.config import Params


def build_refresh_pipeline(params: Params, scheduled: bool = True) -> Any:
    """The ``@dsl.pipeline`` for ``params`` (its ``params_yaml`` default). ``scheduled``: as for the
    training pipeline, False where no schedule-time placeholder can be resolved (kfp.local)."""
    cfg = params.pipeline
    params_text = params_as_text(params)

    def component(func: Any) -> Any:
        return dsl.component(func, base_image=cfg.image, install_kfp_package=False)

    configure_op = component(steps.configure)
    ingest_op = component(steps.ingest)
    spark = launches_spark(params, scheduled)  # a cluster with engine spark: pipelines/spark_task.py
    features_op = spark_features_component(params) if spark else component(steps.features)
    refresh_op = component(steps.index_refresh)

    @dsl.pipeline(
        name=cfg.index_refresh.name,
        description="Hourly: catalogue items created since the last training embedded by the promoted "
        "two-tower's item tower and added to its FAISS index, promoted as a new bundle version.",
    )
    def recsys_index_refresh(
        params_yaml: str = params_text,
        data_source: str = params.data.source,
        data_until: str = "",
    ) -> str:
        def step(task: Any, name: str, cache: bool = True) -> Any:
            return configured_task(task, cfg, name, cfg.step_resources, cache)

        configure = step(
            configure_op(
                params_yaml=params_yaml,
                data_source=data_source,
                gpu_type=cfg.accelerator_type,
                namespace=params.deploy.namespace or "",
                data_until=data_until,
                schedule_time=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER if scheduled else "",
                window="hour",
            ),
            "configure",
        )
        config = configure.outputs
        ingesting = step(ingest_op(config=config["ingest"]), "ingest")
        with_object_store(ingesting, params)  # data_source=events may name s3:// logs
        raw = ingesting.outputs["raw"]
        featuring = step(features_op(config=config["features"], raw=raw), "features")
        if spark:
            with_object_store(featuring, params)
        feature_tables = featuring.outputs["features"]
        # reads and writes the promote store: never cached
        refresh = step(
            refresh_op(config=config["index_refresh"], features=feature_tables), "index-refresh", cache=False
        )
        with_object_store(refresh, params)
        return refresh.outputs["Output"]

    return recsys_index_refresh
