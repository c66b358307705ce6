"""tlkit: transfer learning for image classification on Keras 3 (TensorFlow backend).

The public API, importable without TensorFlow; heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tlkit._version import __version__

__all__ = ["AuditConfig", "DiagnoseConfig", "EvalConfig", "FinetuneConfig", "FreezeRequest",
           "LrFindConfig", "PrecomputeConfig", "__version__", "check_data", "diagnose",
           "evaluate", "export_run", "finetune", "load_dataset", "load_run", "lr_find",
           "merge_parts", "precompute_features", "predict"]

_LAZY = {
    "finetune": "tlkit.train",
    "check_data": "tlkit.audit",
    "export_run": "tlkit.export",
    "load_dataset": "tlkit.datasets",
    "AuditConfig": "tlkit.audit",
    "predict": "tlkit.predict",
    "load_run": "tlkit.runs",
    "FinetuneConfig": "tlkit.config",
    "FreezeRequest": "tlkit.freezing",
    "evaluate": "tlkit.evaluate",
    "EvalConfig": "tlkit.evaluate",
    "precompute_features": "tlkit.precompute",
    "merge_parts": "tlkit.cache",
    "PrecomputeConfig": "tlkit.precompute",
    "diagnose": "tlkit.diagnose",
    "DiagnoseConfig": "tlkit.diagnose",
    "lr_find": "tlkit.lr_find",
    "LrFindConfig": "tlkit.lr_find",
}

if TYPE_CHECKING:
    from tlkit.audit import AuditConfig, check_data
    from tlkit.cache import merge_parts
    from tlkit.config import FinetuneConfig
    from tlkit.datasets import load_dataset
    from tlkit.diagnose import DiagnoseConfig, diagnose
    from tlkit.evaluate import EvalConfig, evaluate
    from tlkit.export import export_run
    from tlkit.freezing import FreezeRequest
    from tlkit.lr_find import LrFindConfig, lr_find
    from tlkit.precompute import PrecomputeConfig, precompute_features
    from tlkit.predict import predict
    from tlkit.runs import load_run
    from tlkit.train import finetune


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
