"""The ``recsys-training`` Kubeflow pipeline: one DAG from raw data to a gated KServe deployment.

```
configure -> ingest -> features -> validate(raw) -> training sets -> validate(training sets)
  -> train two_tower | multi_tower | multi_tower_din | dlrm   (in parallel, GPU)
     [run_search] search   (Optuna per model, GPU, beside the trainings; best configs = Metrics)
  -> evaluate -> export -> build index -> bundle -> gate -> [gate passed] promote -> deploy
```

The pipeline is built from params.yaml at compile time: every task's image is a constant, the whole
reference ``pipeline.image_repo:image_tag`` (CPU steps) or ``pipeline.training_image_repo:image_tag``
(the four GPU training tasks), resources and the accelerator come from the ``pipeline`` section, and the
validated params.yaml content becomes the default of the ``params_yaml`` parameter. Images are not run
parameters: the KFP driver substitutes a parameter into an image only when it is the whole image string
(and ``kfp.local`` never), so a new image means a recompile (``python -m pipelines compile``). The GPU
type, data source and deploy namespace are run parameters.

The ``params_yaml`` default is written as one line of JSON (valid YAML): KFP copies every default into
the comment header of the compiled file, and a multi-line default would break that header's YAML.
"""

# no `from __future__ import annotations`: KFP reads the pipeline's parameter annotations as objects
import json
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from components.deploy import FEAST_CONFIG_DIR, FEAST_PROJECT_ENV, FEAST_YAML_ENV
from models.registry import MODEL_KINDS
from pipelines import steps
from pipelines.spark_task import launches_spark, spark_features_component
from recsys.config import Params, PipelineConfig, Resources, params_from_yaml_text
from recsys.gpu_pods import SHM_PATH, SHM_SIZE_LIMIT, SHM_VOLUME, TRAINING_VOLUME_PATH

COMPILED_HEADER = (
    "# Compiled by `python -m pipelines compile` from pipelines/ and params.yaml; do not edit by hand.\n"
    "# A test fails when this file is stale: recompile after changing either.\n"
)


PIPELINES = ("training", "index-refresh")  # this daily DAG; the hourly one of pipelines/index_refresh.py


def compile_pipeline(
    params_path: Path, output: Path, which: str = "training", images: Path | None = None
) -> Path:
    """Compile pipeline ``which`` (:data:`PIPELINES`) for ``params_path`` to ``output`` (KFP IR YAML).

    ``images``: an image lock file (``images/build.py push``): every task, and the InferenceService the
    deploy step renders, then names its image by the digest the registry returned (recsys/image_lock.py).
    """
    params = params_from_yaml_text(params_path.read_text(), source=str(params_path))
    if images is not None:
        from recsys.image_lock import pin_images, read_lock

        params = pin_images(params, read_lock(images), source=images)
    if which == "training":
        pipeline = build_pipeline(params)
    else:
        from pipelines.index_refresh import build_refresh_pipeline

        pipeline = build_refresh_pipeline(params)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(output))
    output.write_text(COMPILED_HEADER + output.read_text())
    return output


def build_pipeline(params: Params, scheduled: bool = True) -> Any:
    """The ``@dsl.pipeline`` for ``params``, which also become the ``params_yaml`` default.

    ``scheduled``: hand the configure task KFP's schedule-time placeholder (the compiled pipeline);
    ``kfp.local`` has no schedule and cannot resolve that placeholder, so run-local passes False.
    """
    cfg = params.pipeline
    params_text = params_as_text(params)

    def component(func: Any, image: str = cfg.image) -> Any:
        return dsl.component(func, base_image=image, install_kfp_package=False)

    configure_op = component(steps.configure)
    ingest_op = component(steps.ingest)
    # a cluster with engine spark: the task drives a SparkApplication (pipelines/spark_task.py)
    spark = launches_spark(params, scheduled)
    features_op = spark_features_component(params) if spark else component(steps.features)
    validate_op = component(steps.validate)
    training_set_op = component(steps.training_set)
    online_store_op = component(steps.online_store)
    monitor_op = component(steps.monitor)
    train_op = component(steps.train, image=cfg.training_image)
    search_op = component(steps.search, image=cfg.training_image)
    evaluate_op = component(steps.evaluate)
    export_op = component(steps.export)
    build_index_op = component(steps.build_index)
    bundle_op = component(steps.bundle)
    gate_op = component(steps.gate)
    promote_op = component(steps.promote)
    deploy_op = component(steps.deploy)

    @dsl.pipeline(
        name=cfg.name,
        description="Two-stage recommender: features, Feast training sets, two-tower retrieval + three "
        "rankers, FAISS index, gated KServe deployment.",
    )
    def recsys_training(
        params_yaml: str = params_text,
        data_source: str = params.data.source,
        gpu_type: str = cfg.accelerator_type,
        namespace: str = params.deploy.namespace or "",  # "": the deploy task's own namespace
        data_until: str = "",
        deploy_dry_run: bool = False,
        run_search: bool = params.search.enabled,
    ) -> dsl.Model:
        def step(task: Any, name: str, resources: Resources = cfg.step_resources, cache: bool = True) -> Any:
            return configured_task(task, cfg, name, resources, cache)

        configure = step(
            configure_op(
                params_yaml=params_yaml,
                data_source=data_source,
                gpu_type=gpu_type,
                namespace=namespace,
                data_until=data_until,
                # a recurring run trains on the data up to its scheduled day (pipelines/run_window.py)
                schedule_time=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER if scheduled else "",
                # the monitor reads what the deployed pods logged (run-local: the local log)
                served_log=params.deploy.request_log_uri if scheduled else "",
                # the shared registry names feature tables every pod can read (run-local: its own folder)
                feature_tables_uri=cfg.feature_tables_uri if scheduled else "",
            ),
            "configure",
        )
        config = configure.outputs  # per step: the sections its contract reads (recsys/step_contract.py)
        ingesting = step(ingest_op(config=config["ingest"]), "ingest")
        with_object_store(ingesting, params)  # data_source=events may name s3:// logs (sources/events.py)
        raw = ingesting.outputs["raw"]
        featuring = step(features_op(config=config["features"], raw=raw), "features")
        if spark:  # the task and its SparkApplication reach the pipeline root's bucket with these
            with_object_store(featuring, params)
        feature_tables = featuring.outputs["features"]
        validate_raw = step(validate_op(config=config["validate"], target="raw", data=raw), "validate-raw")
        training = step(
            training_set_op(config=config["training_set"], features=feature_tables, raw=raw), "training-set"
        ).after(validate_raw)
        with_feast_config(training, params, in_cluster=scheduled)
        with_object_store(training, params)  # publishes the feature tables the registry names
        training_sets = training.outputs["training_sets"]
        # the online store lives outside the run: backfilled on every run, after the training set registered
        # the feature views, and before any deploy
        online = step(
            online_store_op(config=config["online_store"], features=feature_tables),
            "online-store",
            cache=False,
        ).after(training)
        with_feast_config(online, params, in_cluster=scheduled)
        with_object_store(online, params)
        # the served traffic, checked before anything trains on the new data (reads the world: never cached)
        monitoring = step(
            monitor_op(
                config=config["monitor"], raw=raw, features=feature_tables, training_sets=training_sets
            ),
            "monitor",
            cache=False,
        )
        with_object_store(monitoring, params)
        with_feast_config(monitoring, params, in_cluster=scheduled)
        validate_training = step(
            validate_op(config=config["validate"], target="training", data=training_sets),
            "validate-training-set",
        ).after(monitoring)

        models = {}
        multi_node = cfg.training_nodes > 1
        for kind in MODEL_KINDS:  # in parallel, each on its own accelerator(s)
            task = step(
                train_op(
                    config=config["train"],
                    model_name=kind,
                    training_sets=training_sets,
                    require_gpu=scheduled,  # a cluster's GPU task never trains on CPU; run-local does
                ),
                f"train-{kind.replace('_', '-')}",
                resources=cfg.step_resources if multi_node else cfg.train_resources,
            ).after(validate_training)
            if multi_node:  # the task only drives a PyTorchJob, whose pods hold the GPUs
                kubernetes.mount_pvc(task, pvc_name=cfg.training_volume, mount_path=TRAINING_VOLUME_PATH)
            else:  # torchrun over accelerator_limit GPUs in the task pod (components/launch_training.py)
                task.set_accelerator_type(gpu_type).set_accelerator_limit(cfg.accelerator_limit)
                on_gpu_nodes(task, cfg)
                with_shared_memory(task)
            models[kind] = task.outputs["model"]
        with dsl.If(run_search == True, name="search-enabled"):  # noqa: E712  (KFP condition)
            # a side branch: its report is for the next params.yaml, this run trains on the current one
            searching = step(
                search_op(
                    config=config["search"],
                    gpu_type=gpu_type,
                    training_sets=training_sets,
                    require_gpu=scheduled,
                ),
                "search",
                resources=cfg.train_resources,
            ).after(validate_training)
            searching.set_accelerator_type(gpu_type).set_accelerator_limit(cfg.accelerator_limit)
            on_gpu_nodes(searching, cfg)
            with_shared_memory(searching)

        evaluate = step(
            evaluate_op(
                config=config["evaluate"], features=feature_tables, training_sets=training_sets, **models
            ),
            "evaluate",
        )
        evaluation = evaluate.outputs["evaluation"]
        export = step(
            export_op(
                config=config["export"],
                features=feature_tables,
                training_sets=training_sets,
                two_tower=models["two_tower"],
            ),
            "export",
        ).after(evaluate)
        exported = export.outputs["exported"]
        index = step(build_index_op(config=config["build_index"], exported=exported), "build-index").outputs[
            "index"
        ]
        bundling = step(
            bundle_op(
                config=config["bundle"], exported=exported, index=index, evaluation=evaluation, **models
            ),
            "bundle",
        )
        bundle = bundling.outputs["bundle"]
        # the gate reads the world outside the run (the promoted bundle): never cached
        gate = step(gate_op(config=config["gate"], evaluation=evaluation), "gate", cache=False).after(
            bundling, online
        )
        with_object_store(gate, params)
        with dsl.If(gate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712  (KFP condition)
            # the bundle goes to its versioned object-store place, verified, before anything serves it
            promoting = step(promote_op(config=config["promote"], bundle=bundle), "promote", cache=False)
            with_object_store(promoting, params)
            deploying = step(
                deploy_op(
                    config=config["deploy"], promoted=promoting.outputs["pointer"], dry_run=deploy_dry_run
                ),
                "deploy",
                cache=False,
            )
            with_object_store(deploying, params)  # a rollback restores the promote pointer
        return bundle

    return recsys_training


def configured_task(
    task: Any, cfg: PipelineConfig, name: str, resources: Resources, cache: bool = True
) -> Any:
    """A task's display name, caching, requests and limits, ``pipeline.retries``, the Secrets its pod
    pulls the image with (``pipeline.image_pull_secrets``; kfp-kubernetes, only when there are any) and,
    with ``pipeline.task_security_context``, its container's security context."""
    task.set_display_name(name).set_caching_options(cache)
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    if cfg.retries:
        task.set_retry(cfg.retries)
    if cfg.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cfg.image_pull_secrets))
    if (
        cfg.task_security_context
    ):  # the 2.17 driver then drops every capability (backend/src/v2/driver/k8s.go)
        kubernetes.set_security_context(
            task, run_as_user=cfg.run_as_user, run_as_group=cfg.run_as_user, run_as_non_root=True
        )
    return task


def with_feast_config(task: Any, params: Params, in_cluster: bool = True) -> Any:
    """Give a Feast task the production feature_store.yaml and its credentials (kfp-kubernetes, per task).

    The ConfigMap ``deploy.feast_config_map`` is mounted at /etc/feast, Feast is pointed at it through
    $FEAST_FS_YAML_FILE_PATH, its key FEAST_PROJECT (the environment's project) becomes $FEAST_PROJECT,
    and the keys ``pipeline.feast_secret_keys`` of the Secret
    ``deploy.feast_secret`` become environment variables of the same name (the ${VARS} the yaml uses).
    Only the tasks that open the store get them: a missing Secret stops those tasks, not every pod.
    ``in_cluster`` False (run-local): ``kfp.local`` ignores the Kubernetes config but hands a task's env to
    its subprocess, where /etc/feast does not exist, so the path is left to the local runner.
    """
    kubernetes.use_config_map_as_volume(task, params.deploy.feast_config_map, mount_path=FEAST_CONFIG_DIR)
    # the environment's own Feast project (recsys_dev, recsys_production) from the same ConfigMap
    kubernetes.use_config_map_as_env(
        task, params.deploy.feast_config_map, {FEAST_PROJECT_ENV: FEAST_PROJECT_ENV}
    )
    kubernetes.use_secret_as_env(
        task, params.deploy.feast_secret, {key: key for key in params.pipeline.feast_secret_keys}
    )
    if in_cluster:
        task.set_env_variable(FEAST_YAML_ENV, f"{FEAST_CONFIG_DIR}/feature_store.yaml")
    return task


def with_object_store(task: Any, params: Params) -> Any:
    """The promote store's endpoint and credentials, from the Secret ``promote.secret`` (kfp-kubernetes,
    per task: gate, promote, deploy), under the names boto3 and KServe read (recsys/object_store.py)."""
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
    return kubernetes.use_secret_as_env(task, params.promote.secret, {key: key for key in keys})


def on_gpu_nodes(task: Any, cfg: PipelineConfig) -> Any:
    """The GPU nodes' tolerations and node selector (``pipeline.gpu_tolerations`` / ``gpu_node_selector``)."""
    for toleration in cfg.gpu_tolerations:
        kubernetes.add_toleration(task, **toleration.model_dump())
    for label, value in cfg.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    return task


def with_shared_memory(task: Any) -> Any:
    """A memory-backed /dev/shm (kfp-kubernetes emptyDir; KFP backend >= 2.3): NCCL and DataLoader
    workers share tensors through it, and a container's default is 64 MiB, too small for torchrun."""
    return kubernetes.empty_dir_mount(
        task, volume_name=SHM_VOLUME, mount_path=SHM_PATH, medium="Memory", size_limit=SHM_SIZE_LIMIT
    )


def pipeline_config(cfg: PipelineConfig, which: str) -> PipelineConfig:
    """The ``pipeline`` settings as pipeline ``which`` is uploaded and scheduled: the index refresh has its
    own name and cron and shares everything else (images, namespace, experiment, service account)."""
    if which == "training":
        return cfg
    return cfg.model_copy(update={"name": cfg.index_refresh.name, "cron": cfg.index_refresh.cron})


def params_as_text(params: Params) -> str:
    """The configuration as the ``params_yaml`` argument: one line of JSON, which YAML parsers read."""
    return json.dumps(params.model_dump(mode="json"))
