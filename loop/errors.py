"""Named exceptions. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class DefectLoopError(Exception):
    """Base class of every error defect-loop raises on purpose."""


class ConfigError(DefectLoopError):
    """The project configuration is missing, malformed or inconsistent."""


class TaskTypeChangedError(ConfigError):
    """The config's ``task`` (detect / segment) differs from the one the workspace was made for."""


class InvalidDetectionsError(DefectLoopError, ValueError):
    """Arrays handed to `Detections` have wrong shapes, types or values."""


class UnknownLabelError(DefectLoopError, ValueError):
    """A class name or id is not in the project's fixed class map."""


class ConversionError(DefectLoopError, ValueError):
    """A record could not be converted between formats (bad coordinates, rotation, ...)."""


class ImageError(DefectLoopError):
    """An image file could not be read or is not acceptable."""


class DatasetError(DefectLoopError):
    """A dataset version is missing, inconsistent or would be overwritten."""


class ModelError(DefectLoopError):
    """Training, evaluation or prediction failed, or no model is available yet."""


class ServiceError(DefectLoopError):
    """A local service (Label Studio, MLflow, Prefect) could not be started, stopped or reached."""


class LabelStudioError(DefectLoopError):
    """Label Studio refused a request or returned something defect-loop cannot use."""


class TaskRejectedError(LabelStudioError):
    """One Label Studio task's annotation is unusable; carries the task id for review."""

    def __init__(self, task_id: int, reason: str) -> None:
        super().__init__(f"Label Studio task {task_id}: {reason}")
        self.task_id = task_id
        self.reason = reason


class StrategyError(DefectLoopError, ValueError):
    """An uncertainty strategy got invalid input or does not exist."""


class OfflineViolationError(DefectLoopError):
    """Code tried to reach a non-loopback network address while offline mode is enforced."""


class DeployError(DefectLoopError):
    """A deployment bundle is missing, corrupt or cannot be built, or production cannot move."""


class DriftError(DefectLoopError, ValueError):
    """A drift statistic got unusable input (empty samples, NaN, mismatched shapes)."""


class EvaluationError(DefectLoopError, ValueError):
    """Match statistics, a bootstrap or a paired comparison got inconsistent input."""


class LabelQualityError(DefectLoopError, ValueError):
    """Label-error finding, cross-fitting or annotator quality got inconsistent input (an image
    or task given twice, missing or stale predictions, boxes of different image sizes, too few
    images for the folds)."""


def printable(text: object) -> str:
    """``text`` from outside (a file name, a label) with control characters (newlines, terminal
    escapes) written as ``\\n``, ``\\x1b``, ...: safe to put on one line of a log or console."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))
