"""A bundle's ranker scores given candidates through the model server's own ``ranking`` endpoint.

Off-policy evaluation (components/ope.py) and the simulator's benchmark score a challenger on the
champion's logged candidates. Scoring them with the server (``python -m serving`` on loopback, or a
running one) is what keeps those scores the ones the challenger would serve with: the same online
features, the same encoders, the same ranker call (serving/recommender.py's ``rank``). A step may not
import serving/, so it starts the server as a subprocess: :func:`bundle_server`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from recsys.local_process import NotReadyError, free_port, stop_process, wait_ready

ROOT = Path(__file__).resolve().parents[1]
READY_PATH = "/v2/health/ready"
RANKING_PATH = "/v1/models/ranking:predict"


class RankingClientError(RuntimeError):
    """The server did not start, or did not answer the ranking request."""


def ranking_scores(
    url: str,
    user_ids: Sequence[int | None],
    candidates: Sequence[np.ndarray],
    ranker: str | None = None,
    *,
    batch: int = 64,
    timeout_s: float = 120.0,
) -> list[np.ndarray]:
    """The server's ranker logits for each user's candidates, in the candidates' order (``ranker``: the
    server's ``serving.default_ranker`` when None). ``batch`` users per request (``serving.max_batch``)."""
    import httpx

    if len(user_ids) != len(candidates):
        raise ValueError(f"{len(user_ids)} users for {len(candidates)} candidate lists")
    out: list[np.ndarray] = []
    with httpx.Client(base_url=url, timeout=timeout_s) as http:
        for lo in range(0, len(user_ids), batch):
            instances = []
            for user, items in zip(user_ids[lo : lo + batch], candidates[lo : lo + batch], strict=True):
                if user is None:
                    raise ValueError("ranking needs a user id: an anonymous answer cannot be re-scored")
                instance = {"user_id": int(user), "item_ids": [int(i) for i in items]}
                instances.append(instance | ({"ranker": ranker} if ranker else {}))
            try:
                answer = http.post(RANKING_PATH, json={"instances": instances})
            except httpx.HTTPError as exc:
                raise RankingClientError(f"{url}{RANKING_PATH}: {exc}") from exc
            if answer.status_code != 200:
                raise RankingClientError(
                    f"{url}{RANKING_PATH}: HTTP {answer.status_code}: {answer.text[:500]}"
                )
            for instance, prediction in zip(instances, answer.json()["predictions"], strict=True):
                if prediction["item_ids"] != instance["item_ids"]:
                    raise RankingClientError(f"{url}: the ranking answer reordered the candidates")
                out.append(np.asarray(prediction["scores"], dtype=np.float64))
    return out


@contextmanager
def bundle_server(
    bundle_dir: Path, params_file: Path, *, request_log: str = "off", start_timeout_s: float = 180.0
) -> Iterator[str]:
    """``python -m serving`` for ``bundle_dir`` on a free loopback port for the ``with`` block, run in the
    current folder; yields its base URL. Its request log is off unless ``request_log`` names a folder
    (OPE must not log its own scoring as served traffic)."""
    port = free_port()
    output = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives with the process)
        "w+", prefix=f"serving-{port}-", suffix=".log", delete=False
    )
    command = [sys.executable, "-m", "serving", "--model_dir", str(bundle_dir), "--params", str(params_file)]
    command += ["--http_port", str(port), "--host", "127.0.0.1", "--request_log", request_log]
    # the caller's folder (relative paths in its params, its Feast repo), with the checkout importable
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = os.environ | {"FEAST_USAGE": "False", "PYTHONPATH": path}
    process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(process, url + READY_PATH, output.name, start_timeout_s, f"serving {bundle_dir}")
        except NotReadyError as exc:
            raise RankingClientError(str(exc)) from exc
        yield url
    finally:
        stop_process(process)
        output.close()
