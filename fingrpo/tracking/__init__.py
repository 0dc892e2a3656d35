"""MLflow: one run per training that every later stage logs into, the model registry and its promotion
gate, and the pyfunc model that serves a registered adapter. One module per job:

- :mod:`fingrpo.tracking.client` — the tracking URI, its health check, retries, :class:`Tracker`;
- :mod:`fingrpo.tracking.runs` — provenance tags, the run file, flattening, :class:`MLflowCallback`;
- :mod:`fingrpo.tracking.serving` — the pyfunc (``FinQAPyfuncModel``) and its serving config;
- :mod:`fingrpo.tracking.registry` — registration and the promotion gate (:func:`decide_promotion`).

Where runs go (``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``)::

    fingrpo train      # MLflowCallback: params, per-step metrics, sample tables, tags, the adapter
                       # -> reports/mlflow_run.json {run_id, experiment_id, tracking_uri}
    fingrpo evaluate   # log_evaluation: dev.<set>.adapter.execution_accuracy, ... + eval.json, predictions
    fingrpo plot       # log_plots: the PNGs
    fingrpo register   # register_from_config: new version of 'fingrpo-finqa' (pyfunc), alias
                       # 'challenger'; 'champion' moves only if the challenger beats it
    mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1     # look at it

The trainer, the evaluation and the plots never import mlflow (nor this package): the stage functions of
:mod:`fingrpo.pipeline` call the functions here. Every tracking call goes through
:func:`~fingrpo.tracking.client.call_with_retries` (exponential backoff on transient errors), and URIs
are shown and stored without credentials (:func:`fingrpo.config.redact_uri`). mlflow itself is imported
inside the functions that use it. The names below are resolved lazily (``from fingrpo.tracking import
MLflowCallback`` imports :mod:`~fingrpo.tracking.runs` alone), so a stage imports only the tracking
module it uses and ``dvc.yaml`` lists exactly that one (``tests/test_dvc_deps.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(("DEFAULT_TRACKING_URI", "Tracker", "call_with_retries", "check_tracking",
                     "default_artifact_location", "is_transient_tracking_error", "resolve_tracking_uri"),
                    "fingrpo.tracking.client"),
    **dict.fromkeys(("MLflowCallback", "callbacks_from_config", "current_run", "data_hash", "file_md5",
                     "flatten_config", "flatten_metrics", "git_info", "log_artifacts", "log_evaluation",
                     "log_plots", "provenance_tags", "read_run_file", "write_run_file"), "fingrpo.tracking.runs"),
    # FinQAPyfuncModel: model versions registered before the package split load it from fingrpo.tracking
    **dict.fromkeys(("FinQAPyfuncModel", "PYFUNC_ENTRY_POINT", "SERVING_CONFIG", "pyfunc_signature",
                     "serving_config"), "fingrpo.tracking.serving"),
    **dict.fromkeys(("CHALLENGER", "CHAMPION", "Decision", "decide_promotion", "register_from_config"),
                    "fingrpo.tracking.registry"),
    "redact_uri": "fingrpo.config",  # URIs without credentials (defined with the config that holds them)
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
