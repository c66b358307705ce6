"""tlkit: transfer learning for image classification on Keras 3 (TensorFlow backend).

The public API, importable without TensorFlow; heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tlkit._version import __version__

__all__ = [
    "AuditConfig",
    "BestConfig",
    "DiagnoseConfig",
    "EvalConfig",
    "FinetuneConfig",
    "Fit",
    "FreezeRequest",
    "Loader",
    "LrFindConfig",
    "ModelChoice",
    "PrecomputeConfig",
    "Storage",
    "__version__",
    "best",
    "check_data",
    "diagnose",
    "evaluate",
    "export_ensemble",
    "export_run",
    "finetune",
    "load_dataset",
    "load_run",
    "lr_find",
    "merge_parts",
    "precompute_features",
    "predict",
]

_LAZY = {
    "finetune": "tlkit.training.train",
    "check_data": "tlkit.data.audit",
    "export_run": "tlkit.evaluation.export",
    "export_ensemble": "tlkit.evaluation.export",
    "load_dataset": "tlkit.data.datasets",
    "AuditConfig": "tlkit.data.audit",
    "predict": "tlkit.evaluation.predict",
    "load_run": "tlkit.core.runs",
    "FinetuneConfig": "tlkit.training.config",
    "FreezeRequest": "tlkit.models.freezing",
    "ModelChoice": "tlkit.models.freezing",
    "Fit": "tlkit.training.config",
    "Storage": "tlkit.training.config",
    "Loader": "tlkit.core.settings",
    "evaluate": "tlkit.evaluation.evaluate",
    "EvalConfig": "tlkit.evaluation.evaluate",
    "precompute_features": "tlkit.features.precompute",
    "merge_parts": "tlkit.features.cache",
    "PrecomputeConfig": "tlkit.features.precompute",
    "diagnose": "tlkit.evaluation.diagnose",
    "DiagnoseConfig": "tlkit.evaluation.diagnose",
    "lr_find": "tlkit.training.lr_find",
    "LrFindConfig": "tlkit.training.lr_find",
    "best": "tlkit.preset.best",
    "BestConfig": "tlkit.preset.best",
}

if TYPE_CHECKING:
    from tlkit.core.runs import load_run
    from tlkit.core.settings import Loader
    from tlkit.data.audit import AuditConfig, check_data
    from tlkit.data.datasets import load_dataset
    from tlkit.evaluation.diagnose import DiagnoseConfig, diagnose
    from tlkit.evaluation.evaluate import EvalConfig, evaluate
    from tlkit.evaluation.export import export_ensemble, export_run
    from tlkit.evaluation.predict import predict
    from tlkit.features.cache import merge_parts
    from tlkit.features.precompute import PrecomputeConfig, precompute_features
    from tlkit.models.freezing import FreezeRequest, ModelChoice
    from tlkit.preset.best import BestConfig, best
    from tlkit.training.config import FinetuneConfig, Fit, Storage
    from tlkit.training.lr_find import LrFindConfig, lr_find
    from tlkit.training.train import finetune


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
