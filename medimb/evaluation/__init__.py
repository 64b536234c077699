"""medimb.evaluation: prediction over a dataset, imbalance-aware metrics, plots, and the one evaluation
output (metrics.json, predictions.csv, plots/) that train, evaluate, explain and the bundles write.
Localisation metrics live in ``localization``. Imported on first use (PEP 562)."""

from medimb.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("CI_KEYS", "SUMMARY_KEYS", "UndefinedMetricWarning", "bootstrap_ci", "compute_metrics",
                     "expected_calibration_error", "format_ci_summary", "format_summary"), "metrics"),
    **dict.fromkeys(("choose_and_store", "choose_threshold", "predict_classes", "resolve_operating_point",
                     "sensitivity_rule", "store_operating_point", "threshold_for"), "operating_point"),
    **dict.fromkeys(("plot_confusion_matrix", "plot_embedding", "plot_pr", "plot_reliability", "plot_roc"),
                    "plots"),
    **dict.fromkeys(("EVAL_BATCH", "flip_combinations", "predict", "uses_flip_tta"), "prediction"),
    **dict.fromkeys(("SplitPredictions", "read_predictions", "write_predictions"), "predictions_csv"),
    **dict.fromkeys(("EvaluationReport", "interval_lines", "write_evaluation"), "report"),
    "evaluate_checkpoint": "evaluate",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
