"""Typed errors for everything a user can cause.

The CLI turns any :class:`FlexiError` into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class FlexiError(Exception):
    """Base class of every error a user can cause (bad path, bad plan, unsupported model, ...)."""

    exit_code: int = 2


class InputError(FlexiError):
    """A path, file or option given by the user is missing or unusable."""


class UnsupportedModelError(FlexiError):
    """The model's architecture (``model_type``) has no :class:`~flexi_export.layouts.DecoderLayout`."""


class PlanError(FlexiError):
    """A :class:`~flexi_export.plan.BlockPlan` is invalid or does not fit the model it is applied to."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = f"invalid plan: {self.problems[0]}"
        else:
            message = f"invalid plan ({len(self.problems)} problems): " + "; ".join(self.problems)
        super().__init__(message)


class CheckpointError(FlexiError):
    """A checkpoint folder is incomplete, corrupt, or does not match its plan."""


class DataError(InputError):
    """Calibration, training or evaluation text is missing, empty or unreadable."""


class CompressError(FlexiError):
    """A compression request cannot be met for this model (unreachable ratio, too few blocks, rank too large)."""


class ExportError(FlexiError):
    """An export cannot be done as asked (bad option, model the exporter cannot express, failed self-check)."""


class BundleError(FlexiError):
    """An exported bundle is incomplete, or its files do not match its manifest."""


class VerificationError(FlexiError):
    """Verification could not run (not: a check failed; failed checks are reported, not raised)."""
