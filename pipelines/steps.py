"""The pipeline's components: one thin wrapper per step, calling the step's ``run(...)``.

Each function becomes a KFP lightweight component (``pipelines/recsys_training.py`` decorates it with the
project image as ``base_image``). KFP ships only the function's source to the container, so everything
it needs is imported inside it, from the project installed in the image. ``configure`` validates the
run's whole configuration once and hands every step only the sections its contract declares
(recsys/step_contract.py), so a task's inputs, and KFP's cache key, change only when its own sections
do. A wrapper parses its ``config``, hands the step those sections and the artifact paths, and publishes
metrics/reports as typed artifacts; no step logic lives here. Each wrapper's artifact parameters are its
contract's named inputs and outputs (a test checks them).

No ``from __future__ import annotations`` in this module: KFP reads the artifact annotations
(``Input[Dataset]``, ``Output[Model]``, ...) at decoration time and needs them as objects.
"""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def configure(
    params_yaml: str,
    data_source: str,
    gpu_type: str,
    namespace: str,
    data_until: str = "",
    schedule_time: str = "",
    window: str = "day",
    served_log: str = "",
    feature_tables_uri: str = "",
) -> NamedTuple(  # one scoped configuration per step of recsys.step_contract.STEPS (a test checks the names)
    "StepConfigs",
    [
        ("ingest", str),
        ("features", str),
        ("validate", str),
        ("training_set", str),
        ("monitor", str),
        ("online_store", str),
        ("search", str),
        ("train", str),
        ("evaluate", str),
        ("export", str),
        ("build_index", str),
        ("bundle", str),
        ("gate", str),
        ("promote", str),
        ("deploy", str),
        ("index_refresh", str),
    ],
):
    """Validate the run's configuration once, before any work: params.yaml text + the run's overrides.

    ``data.until`` becomes the start of the run's ``window`` (a day; the index refresh's hour;
    pipelines/run_window.py): ``data_until`` if given, else the scheduled time of a recurring run.
    Returns, per step, the sections of the effective configuration
    that step reads (recsys/step_contract.py): the whole run agrees, a new day is a new input for every
    task that reads ``data``, and a change to ``serving.*`` leaves the trainings' inputs as they were.
    ``served_log``: where the deployed pods write the request log (``deploy.request_log_uri``), which a
    cluster run's monitor reads instead of the local ``serving.request_log.uri``.
    ``feature_tables_uri``: where a cluster run's Feast tasks publish the feature tables that the shared
    registry's FileSources name (``feast.source_uri``; recsys/feature_sources.py).
    """
    from pipelines.run_window import data_until as run_day
    from recsys.config import params_from_yaml_text, parse_params
    from recsys.step_contract import STEPS, scoped_configs

    effective = params_from_yaml_text(params_yaml, source="params_yaml").model_dump(mode="json")
    day = run_day(data_until, schedule_time, window)
    if day is not None:
        effective["data"]["until"] = day.isoformat()
    effective["data"]["source"] = data_source
    effective["pipeline"]["accelerator_type"] = gpu_type
    effective["deploy"]["namespace"] = namespace or None  # "": the deploy task's own
    if served_log:
        effective["serving"]["request_log"]["uri"] = served_log
    if feature_tables_uri:
        effective["feast"]["source_uri"] = feature_tables_uri
    params = parse_params(effective, source="params_yaml with the run's parameters")
    # KFP ships this function's source alone, so the outputs type is spelled in the signature (inline)
    outputs = configure.__annotations__["return"]
    configs = scoped_configs(params, STEPS.values())
    return outputs(**{name: configs[name] for name in outputs._fields})


def ingest(config: str, raw: Output[Dataset]) -> None:
    """Raw users/items/events tables from the configured source (components/ingest.py)."""
    from components import ingest as step
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["ingest"])
    step.run(params.data, params.seed, raw.path)


def features(config: str, raw: Input[Dataset], features: Output[Dataset]) -> None:
    """Point-in-time feature tables for the Feast file sources (components/features.py)."""
    from components import features as step
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["features"])
    step.run(params.features, raw.path, features.path)


def validate(
    config: str,
    target: str,
    data: Input[Dataset],
    data_docs: Output[HTML],
    data_docs_site: Output[Artifact],
    summary: Output[Metrics],
) -> None:
    """great-expectations gate on the raw tables or the training sets (components/validate.py).

    A failed expectation fails the task (the log names expectation, column and bad values), so nothing
    downstream runs. ``data_docs`` is the Data Docs overview page the KFP UI shows; the whole site, with
    a page per validated table, is ``data_docs_site``.
    """
    import shutil

    from components import validate as step
    from pipelines.metrics_artifact import publish_metrics
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["validate"])
    result = step.run(
        params.validation, target, data.path, report_dir=data_docs_site.path, summary_file=summary.path
    )
    shutil.copyfile(result["data_docs"], data_docs.path)
    publish_metrics(summary.path, summary)


def training_set(
    config: str,
    features: Input[Dataset],
    raw: Input[Dataset],
    training_sets: Output[Dataset],
    report: Output[Markdown],
    stats: Output[Metrics],
) -> None:
    """Point-in-time training sets from Feast (components/training_set.py); the online store backfill is
    the ``online_store`` step's, which is never cached.

    In the cluster Feast uses the production feature_store.yaml from $FEAST_FS_YAML_FILE_PATH.
    """
    from components import training_set as step
    from pipelines.metrics_artifact import publish_metrics
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["training_set"])
    step.run(
        params.training_set,
        features.path,
        raw.path,
        training_sets.path,
        feast=params.feast.model_copy(update={"materialize": False}),
        features=params.features,
        metrics_file=stats.path,
        report_file=report.path,
    )
    publish_metrics(stats.path, stats)


def monitor(
    config: str,
    raw: Input[Dataset],
    features: Input[Dataset],
    training_sets: Input[Dataset],
    report: Output[HTML],
    checks: Output[Metrics],
) -> str:
    """Check the served traffic before training (components/monitor.py): the request log
    (``serving.request_log.uri``, an ``s3://`` prefix in the cluster) against the run's training set, and
    the bundle current in the promote store (nothing promoted yet: its checks are skipped); the skew
    check recomputes served features with Feast's offline store over the run's feature tables. A failed check
    with ``monitor.stop_on_fail`` fails the task, so the run stops before training. Returns the status."""
    import tempfile
    from pathlib import Path

    from components import monitor as step
    from pipelines.metrics_artifact import publish_metrics
    from recsys.object_store import fetch_promoted, open_store
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["monitor"])
    offline = step.OfflineFeatures(params.feast, params.features, params.training_set, Path(features.path))
    with tempfile.TemporaryDirectory() as scratch:
        bundle_dir = fetch_promoted(open_store(params.promote.uri), Path(scratch) / "bundle")
        result = step.run(
            params.monitor,
            params.serving,
            Path(raw.path),
            Path(training_sets.path),
            bundle_dir,
            output=Path(checks.path),
            textfile=Path(scratch) / "monitor.prom",
            report_file=Path(report.path),
            offline=offline,
            docs_dir=Path(scratch) / "data_docs",
        )
    publish_metrics(checks.path, checks)
    failed = [name for name, check in result["checks"].items() if check["status"] == "fail"]
    if failed and params.monitor.stop_on_fail:
        raise RuntimeError(f"monitor: failed checks {failed} (monitor.stop_on_fail); see the report artifact")
    return str(result["status"])


def online_store(config: str, features: Input[Dataset]) -> str:
    """Backfill Feast's online store from the run's feature tables, so serving reads the newest values.

    Its own step, never cached: the store lives outside the run, and a cached training-set step would
    otherwise leave a new or emptied store unfilled. Returns the materialised window ("" when
    ``feast.materialize`` is off).
    """
    import json

    from components import online_store as step
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["online_store"])
    if not params.feast.materialize:
        return ""
    return json.dumps(step.run(params.feast, params.features, features.path))


def search(
    config: str,
    gpu_type: str,
    training_sets: Input[Dataset],
    search: Output[Metrics],
    require_gpu: bool = False,
) -> None:
    """Optuna search per model on the validation split (components/search.py), when the run asks for it.

    The pipeline runs this task only under its ``run_search`` parameter, so here the search is on whatever
    ``search.enabled`` says. The report (best value and configuration per model, next to params.yaml's own,
    and the accelerator its timings were taken on) is the task's Metrics artifact; copy ``best_params``
    into params.yaml to adopt them, as locally. ``gpu_type`` is an input, not only the task's accelerator:
    KFP passes a run parameter into a ``dsl.If`` group only through its tasks' inputs (kfp 2.x compiles
    one used just in a resource field to a reference the group does not have; kubeflow/pipelines#12617).
    ``require_gpu`` (the compiled pipeline, not run-local): fail unless CUDA shows the task's
    ``pipeline.accelerator_limit`` GPUs, rather than timing trials on CPU.
    """
    import json
    from pathlib import Path

    from components import search as step
    from pipelines.metrics_artifact import publish_metrics
    from recsys.gpu_pods import require_gpus
    from recsys.step_contract import STEPS, step_params_from_json

    raw = step_params_from_json(config, STEPS["search"]).dump()
    raw["search"]["enabled"] = True
    params = STEPS["search"].from_raw(raw, source="the search task's config with run_search")
    if require_gpu:
        require_gpus(params.pipeline.accelerator_limit, gpu_type)
    report = step.run(params, raw, training_sets.path, output=search.path)
    Path(search.path).write_text(json.dumps(report | {"accelerator_type": gpu_type}, indent=2) + "\n")
    publish_metrics(search.path, search)


def train(
    config: str,
    model_name: str,
    training_sets: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[HTML],
    require_gpu: bool = False,
) -> None:
    """Train one registered model on the training sets (components/train.py); CUDA when present.

    Through the launcher (components/launch_training.py): torchrun over ``pipeline.accelerator_limit``
    GPUs in this pod, or a PyTorchJob over ``pipeline.training_nodes`` pods. ``require_gpu`` (the
    compiled pipeline, not run-local): fail unless CUDA shows those GPUs, rather than train on CPU.
    """
    import tempfile
    from pathlib import Path

    from components import launch_training as step
    from pipelines.metrics_artifact import png_page, publish_metrics
    from recsys.step_contract import STEPS, step_params_from_json

    with tempfile.TemporaryDirectory() as scratch:
        params_file = Path(scratch) / "params.yaml"  # the train step's sections, for its subprocesses
        params_file.write_text(step_params_from_json(config, STEPS["train"]).to_yaml())
        plot = Path(scratch) / f"{model_name}.png"
        step.run(
            model_name,
            params_file,
            training_sets.path,
            model.path,
            metrics.path,
            plot,
            require_gpu=require_gpu,
        )
        png_page(plot, curves.path, title=f"{model_name}: loss and validation metric per epoch")
    publish_metrics(metrics.path, metrics)


def evaluate(
    config: str,
    features: Input[Dataset],
    training_sets: Input[Dataset],
    two_tower: Input[Model],
    multi_tower: Input[Model],
    multi_tower_din: Input[Model],
    dlrm: Input[Model],
    evaluation: Output[Metrics],
) -> None:
    """Every model on the test window next to its baseline (components/evaluate.py).

    The step reads ``<models_dir>/<model>/``; here each model is its own artifact, so the directory is
    a scratch folder of links to them.
    """
    import tempfile
    from pathlib import Path

    from components import evaluate as step
    from pipelines.metrics_artifact import publish_metrics
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["evaluate"])
    models = {
        "two_tower": two_tower,
        "multi_tower": multi_tower,
        "multi_tower_din": multi_tower_din,
        "dlrm": dlrm,
    }
    with tempfile.TemporaryDirectory() as models_dir:
        for kind, model in models.items():
            (Path(models_dir) / kind).symlink_to(Path(model.path).resolve(), target_is_directory=True)
        step.run(params, training_sets.path, models_dir, features.path, evaluation.path)
    publish_metrics(evaluation.path, evaluation)


def export(
    config: str,
    features: Input[Dataset],
    training_sets: Input[Dataset],
    two_tower: Input[Model],
    exported: Output[Model],
) -> None:
    """Item embeddings of the catalogue, validation query vectors, popular items (components/export.py)."""
    from pathlib import Path

    from components import export as step
    from recsys import artifact_layout as layout
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["export"])
    popular = Path(exported.path) / layout.POPULAR_ITEMS
    step.run(params, training_sets.path, two_tower.path, features.path, exported.path, popular)


def build_index(config: str, exported: Input[Model], index: Output[Model], metrics: Output[Metrics]) -> None:
    """FAISS inner-product index over the item embeddings, search tuned (components/build_index.py)."""
    from pathlib import Path

    from components import build_index as step
    from pipelines.metrics_artifact import publish_metrics
    from recsys import artifact_layout as layout
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["build_index"])
    # export's artifact holds the embeddings; this task's artifact is the index folder
    step.run(
        params.index,
        params.seed,
        item_embeddings=Path(exported.path) / layout.ITEM_EMBEDDINGS,
        query_embeddings=Path(exported.path) / layout.QUERY_EMBEDDINGS,
        output=Path(index.path) / layout.INDEX,
        metrics_file=metrics.path,
    )
    publish_metrics(metrics.path, metrics)


def bundle(
    config: str,
    exported: Input[Model],
    index: Input[Model],
    two_tower: Input[Model],
    multi_tower: Input[Model],
    multi_tower_din: Input[Model],
    dlrm: Input[Model],
    evaluation: Input[Metrics],
    bundle: Output[Model],
) -> None:
    """The versioned, checksummed bundle serving loads as a unit (components/bundle.py).

    The members are recsys/artifact_layout.py's, each local folder of that layout being a task's
    artifact here.
    """
    import tempfile
    from pathlib import Path

    from components import bundle as step
    from recsys import artifact_layout as layout
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["bundle"])
    models = {
        "two_tower": two_tower,
        "multi_tower": multi_tower,
        "multi_tower_din": multi_tower_din,
        "dlrm": dlrm,
    }
    # each folder of the local layout is a task's artifact here
    members = layout.bundle_members(
        model_dirs={kind: model.path for kind, model in models.items()},
        embeddings_dir=exported.path,
        export_dir=exported.path,
        index_dir=index.path,
    )
    with tempfile.TemporaryDirectory() as scratch:
        params_file = Path(scratch) / "params.yaml"
        params_file.write_text(params.to_yaml())
        step.run(params_file, evaluation.path, bundle.path, members)


def gate(config: str, evaluation: Input[Metrics], decision: Output[Metrics]) -> bool:
    """Pass only if no chosen metric is worse than the promoted bundle's (components/gate.py).

    The deployed bundle is the one current in the promote store (``promote.uri``; endpoint and credentials
    from the ``promote.secret`` environment); nothing promoted yet is a first deploy. Returns the decision;
    the pipeline promotes and deploys under ``dsl.If`` on it.
    """
    from components import gate as step
    from pipelines.metrics_artifact import publish_metrics
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["gate"])
    result = step.run(
        params.gate, metrics_file=evaluation.path, output=decision.path, deployed_bundle=params.promote.uri
    )
    publish_metrics(decision.path, decision)
    decision.log_metric("passed", float(result["passed"]))
    return bool(result["passed"])


def promote(config: str, bundle: Input[Model], pointer: Output[Artifact]) -> str:
    """Copy the gated bundle to ``<promote.uri>/<version>/``, verify it there, make it current
    (components/promote.py). ``pointer`` is the promote store's new ``current.json``; returns the
    promoted version's URI."""
    from components import promote as step
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["promote"])
    return step.run(params.promote, bundle.path, output=pointer.path)["uri"]


def deploy(config: str, promoted: Input[Artifact], dry_run: bool, manifest: Output[Artifact]) -> str:
    """Roll the InferenceService out to the promoted bundle; returns its URL (components/deploy.py).

    Only the model (image, ``STORAGE_URI``) is patched on an existing service, as a canary. A rollback
    also puts the promote pointer back to the version it replaced, so the next run's gate compares with
    what serves. ``dry_run`` renders the InferenceService without a cluster (``run-local`` uses it).
    """
    import json
    import logging

    from components import deploy as step
    from recsys.object_store import open_store, restore_previous
    from recsys.step_contract import STEPS, step_params_from_json

    params = step_params_from_json(config, STEPS["deploy"])
    with open(promoted.path) as fh:
        pointer = json.load(fh)

    def restore_pointer(reason: str) -> None:
        current = restore_previous(open_store(params.promote.uri), pointer["version"])
        logging.getLogger(__name__).error(
            "deploy: %s rolled back (%s); current promoted version: %s",
            pointer["version"],
            reason,
            current["version"] if current else "none",
        )

    url = step.run(
        params.deploy,
        params.pipeline.image_tag,
        pointer["uri"],
        manifest.path,
        dry_run=dry_run,
        on_rollback=restore_pointer,
        promote=params.promote,
    )
    return url or ""


def index_refresh(config: str, features: Input[Dataset], report: Output[Metrics]) -> str:
    """The hourly pipeline's step: the promoted bundle grown by the catalogue items it lacks
    (components/index_refresh.py), promoted as a new version only while the version it grew from is
    still current (compare-and-swap on ``current.json``), so a training run promoting in between is never
    replaced by an older model: the refresh then stands down (``superseded`` in the report; the next hour
    grows the new version). Running servers with ``serving.index_swap`` take it up. Returns the version
    current afterwards ("" when nothing was ever promoted: there is no index to grow)."""
    import logging
    import tempfile
    from pathlib import Path

    from components import index_refresh as step
    from components import promote
    from pipelines.metrics_artifact import publish_metrics
    from recsys.artifact_io import write_json
    from recsys.object_store import fetch_promoted, open_store, read_pointer
    from recsys.step_contract import STEPS, step_params_from_json

    log = logging.getLogger(__name__)
    params = step_params_from_json(config, STEPS["index_refresh"])
    store = open_store(params.promote.uri)
    with tempfile.TemporaryDirectory() as scratch:
        grown_from = read_pointer(store)
        bundle_dir = fetch_promoted(store, Path(scratch) / "bundle") if grown_from else None
        if grown_from is None or bundle_dir is None:
            write_json({"promoted": 0.0, "added_items": 0}, report.path)
            publish_metrics(report.path, report)
            log.warning("index refresh: nothing promoted yet in %s", params.promote.uri)
            return ""
        out_dir = Path(scratch) / "refreshed"
        result = step.run(params.feast, bundle_dir, Path(features.path), out_dir, report.path)
        current, superseded = grown_from["version"], False
        if result["version"] != result["from"]:  # items were added: a new bundle version
            try:
                current = promote.run(
                    params.promote, out_dir, version=result["version"], require_current=grown_from["version"]
                )["version"]
            except promote.PromoteError:
                now = read_pointer(store)
                if now is None or now["version"] == grown_from["version"]:
                    raise  # not a newer promotion: the upload or the store failed
                current, superseded = now["version"], True
                log.warning(
                    "index refresh: %s was promoted while %s grew; standing down",
                    current,
                    grown_from["version"],
                )
        promoted = float(current == result["version"] != result["from"])
        write_json(result | {"promoted": promoted, "superseded": float(superseded)}, report.path)
    publish_metrics(report.path, report)
    return current
