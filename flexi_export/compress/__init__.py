"""FlexiGPT-style compression: Block Influence, pruning plan, weight-shared replacements with SVD-initialised
adapters and output feature normalisation, recovery by distillation, extension, evaluation and reports.

One module per job: :mod:`~flexi_export.compress.data` (text), :mod:`~flexi_export.compress.influence` (BI),
:mod:`~flexi_export.compress.choose` (replacement sources), :mod:`~flexi_export.compress.planner` (make_plan),
:mod:`~flexi_export.compress.init` (adapters, OFN gamma), :mod:`~flexi_export.compress.recover` (training),
:mod:`~flexi_export.compress.extend`, :mod:`~flexi_export.compress.evaluate`, :mod:`~flexi_export.compress.report`
and :mod:`~flexi_export.compress.pipeline` (``flexi-export compress`` end to end).
"""

from flexi_export.compress.evaluate import EvalResult, evaluate_model, evaluate_path
from flexi_export.compress.influence import block_influence
from flexi_export.compress.pipeline import CompressOptions, compress
from flexi_export.compress.planner import PlanOptions, PlanResult, make_plan
from flexi_export.compress.recover import RecoveryConfig, RecoveryResult, recover

__all__ = [
    "CompressOptions",
    "EvalResult",
    "PlanOptions",
    "PlanResult",
    "RecoveryConfig",
    "RecoveryResult",
    "block_influence",
    "compress",
    "evaluate_model",
    "evaluate_path",
    "make_plan",
    "recover",
]
