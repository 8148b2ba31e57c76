"""``python -m pipelines compile|upload|schedule|run-local``: the Kubeflow side of the project.

- ``compile [--images images/pushed.json]``: the KFP v2 pipelines' YAML (committed as
  pipelines/recsys_training.yaml and pipelines/recsys_index_refresh.yaml; a test fails when either is
  stale); ``--images``: every task's image, and the serving image the deploy step renders, by the digest
  ``images/build.py push`` recorded (recsys/image_lock.py).
- ``upload --host URL [--pipeline training|index-refresh] [--version NAME]``: a new pipeline, or a new
  version of it.
- ``schedule --host URL [--pipeline ...] [--cron "0 0 3 * * *"] [--experiment NAME]``: the pipeline's
  recurring run (KFP's cron has 6 fields, seconds first; it is validated before the server is called);
  scheduling again replaces the pipeline's earlier recurring run instead of adding a second one.
- ``run-local [--preset tiny] [--runner subprocess|docker]``: the whole DAG through KFP's local runner,
  no cluster; ``--runner docker`` runs every task in the built image.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from recsys import artifact_layout as layout
from recsys.config import ConfigError, load_params

PACKAGES = {  # the compiled pipelines, committed
    "training": Path("pipelines/recsys_training.yaml"),
    "index-refresh": Path("pipelines/recsys_index_refresh.yaml"),
}


def main(argv: list[str] | None = None, kfp_client: object | None = None) -> int:
    """CLI entry point; ``kfp_client`` replaces the ``kfp.Client`` that upload/schedule would connect."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from pipelines.kubeflow import KubeflowError

    try:
        params = load_params(args.params)
        return args.handler(args, params, kfp_client)
    except (ConfigError, KubeflowError) as exc:
        print(f"pipelines {args.command}: {exc}", file=sys.stderr)
        return 1


def _compile(args: argparse.Namespace, params, _client) -> int:
    from pipelines.recsys_training import compile_pipeline

    # --output names one file: the training pipeline's unless --pipeline says which
    which = [args.pipeline or "training"] if args.output or args.pipeline else list(PACKAGES)
    for name in which:
        images = Path(args.images) if args.images else None
        print(compile_pipeline(Path(args.params), Path(args.output or PACKAGES[name]), name, images))
    return 0


def _upload(args: argparse.Namespace, params, client) -> int:
    from pipelines import kubeflow

    namespace = params.pipeline.namespace if args.namespace is None else args.namespace
    client = client or kubeflow.connect(args.host, namespace, args.token_file)
    package = Path(args.package or PACKAGES[args.pipeline])
    kubeflow.check_package_fits(package, kubeflow.check_server_version(client))
    namespace = namespace or kubeflow.client_namespace(client)
    uploaded = kubeflow.upload(client, package, _target(params, args), args.version, namespace)
    print(f"pipeline {uploaded.pipeline_id} version {uploaded.version_name} ({uploaded.version_id})")
    return 0


def _schedule(args: argparse.Namespace, params, client) -> int:
    from pipelines import kubeflow

    target = _target(params, args)
    cron = kubeflow.checked_cron(args.cron or target.cron)  # before connecting to anything
    namespace = params.pipeline.namespace if args.namespace is None else args.namespace
    client = client or kubeflow.connect(args.host, namespace, args.token_file)
    kubeflow.check_server_version(client)
    namespace = namespace or kubeflow.client_namespace(client)
    run = kubeflow.schedule(client, target, cron, args.experiment, args.version, namespace)
    print(f"recurring run {getattr(run, 'recurring_run_id', run)} on '{cron}'")
    return 0


def _target(params, args: argparse.Namespace):
    from pipelines.recsys_training import pipeline_config

    return pipeline_config(params.pipeline, args.pipeline)


def _run_local(args: argparse.Namespace, params, _client) -> int:
    from pipelines.local_run import LocalRunError, run_local

    try:
        bundle = run_local(
            Path(args.params),
            preset=args.preset,
            pipeline_root=Path(args.pipeline_root),
            runner=args.runner,
            training_image=args.training_image,
        )
    except LocalRunError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(bundle)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the project configuration file")
    commands = parser.add_subparsers(dest="command", required=True)

    compile_cmd = commands.add_parser("compile", help="write the compiled pipelines' YAML")
    compile_cmd.add_argument("--pipeline", default=None, choices=list(PACKAGES), help="default: both")
    compile_cmd.add_argument("--output", default=None, help="one pipeline's file (default: each to its own)")
    compile_cmd.add_argument(
        "--images",
        default=None,
        help="an image lock (images/build.py push writes images/pushed.json): every image by its digest",
    )
    compile_cmd.set_defaults(handler=_compile)

    def server(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = commands.add_parser(name, help=help_text)
        cmd.add_argument(
            "--host", required=True, help="the KFP API endpoint, e.g. https://kubeflow.example.com/pipeline"
        )
        cmd.add_argument(
            "--namespace",
            default=None,
            help="Kubeflow profile namespace (default: pipeline.namespace, null: the kfp client's)",
        )
        cmd.add_argument("--version", default=None, help="pipeline version name")
        cmd.add_argument(
            "--pipeline",
            default="training",
            choices=list(PACKAGES),
            help="the daily training DAG, or the hourly index refresh (pipeline.index_refresh)",
        )
        cmd.add_argument(
            "--token-file",
            default=None,
            help="a ServiceAccount token file to authenticate with (else $KFP_TOKEN or $KFP_COOKIE, or none)",
        )
        return cmd

    upload_cmd = server("upload", "upload the compiled pipeline (new pipeline or new version)")
    upload_cmd.add_argument("--package", default=None, help="the compiled YAML (default: --pipeline's)")
    upload_cmd.set_defaults(handler=_upload)

    schedule_cmd = server("schedule", "create a recurring run of the uploaded pipeline")
    schedule_cmd.add_argument(
        "--cron", default=None, help="6 fields, seconds first (default: pipeline.cron / index_refresh.cron)"
    )
    schedule_cmd.add_argument("--experiment", default=None, help="default: pipeline.experiment")
    schedule_cmd.set_defaults(handler=_schedule)

    local_cmd = commands.add_parser("run-local", help="run the whole DAG with kfp.local (no cluster)")
    local_cmd.add_argument(
        "--preset", default=None, choices=["tiny", "small", "default", "large"], help="synthetic size"
    )
    local_cmd.add_argument("--pipeline-root", default=str(layout.KFP_LOCAL_DIR), help="where task outputs go")
    local_cmd.add_argument(
        "--runner",
        default="subprocess",
        choices=["subprocess", "docker"],
        help="subprocess: tasks as processes of this venv; docker: each task in its image (make images)",
    )
    local_cmd.add_argument(
        "--training-image",
        default="cpu",
        choices=["cpu", "cuda"],
        help="docker runner: train in the pipeline (CPU) image, or in pipeline.training_image (CUDA)",
    )
    local_cmd.set_defaults(handler=_run_local)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
