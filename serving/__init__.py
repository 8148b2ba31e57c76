"""KServe model server for the recommender: ``retrieval``, ``ranking`` and ``recommend`` models.

``python -m serving --model_dir artifacts/bundle`` loads a checksummed bundle (components/bundle.py) and
hosts the three models on one KServe ``ModelServer`` (V1 and V2 REST, liveness/readiness, ``/metrics``).

KServe parses ``sys.argv`` when ``kserve.model_server`` is first imported and fails on, or silently
adopts, arguments meant for someone else (pytest's, ours). The package imports it here, once, with a
bare argv, so every submodule and test gets KServe's defaults; our own CLI is parsed in ``__main__``.
"""

from __future__ import annotations

import sys

_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve.model_server  # noqa: F401  (parses argv at import, see above)
finally:
    sys.argv = _argv
