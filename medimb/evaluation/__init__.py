"""medimb.evaluation: imbalance-aware metrics and plots (localisation metrics live in ``localization``)."""

from medimb.evaluation.metrics import UndefinedMetricWarning, compute_metrics, expected_calibration_error
from medimb.evaluation.plots import plot_confusion_matrix, plot_embedding, plot_pr, plot_roc

__all__ = [
    "UndefinedMetricWarning", "compute_metrics", "expected_calibration_error", "plot_confusion_matrix",
    "plot_embedding", "plot_pr", "plot_roc",
]
