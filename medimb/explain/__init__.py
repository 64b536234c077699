"""medimb.explain: COAM and CAM/Grad-CAM attention maps, exported as overlays on the source scan.

>>> heat = COAM(model)(x)                      # (B, C, *S) -> (B, 1, *S) in [0, 1], 1 = attended
>>> heat = create_explainer("gradcam", model)(x, class_idx=1)

The exporter (:mod:`medimb.explain.export`) inverts maps to the source NIfTI grid; the pipeline
(:func:`run_explain`, ``medimb explain``) writes heatmaps, label maps, PNG previews, index.html,
predictions.csv and a 3D Slicer loader script. Imported on first use (PEP 562).
"""

from medimb.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("CAMExplainer", "FeatureMapClassifier", "GradCAMExplainer", "cam_classifier"), "cam"),
    **dict.fromkeys(("COAM", "coam_from_features", "upsample_to"), "coam"),
    **dict.fromkeys(("forward_to_network_grid", "invert_to_source", "threshold_region", "write_heatmap",
                     "write_label"), "export"),
    **dict.fromkeys(("EXPLAINERS", "create_explainer"), "methods"),
    "minmax_per_volume": "normalize",
    **dict.fromkeys(("CLASS_FREE_EXPLAINERS", "DEFAULT_EXPLAINERS", "DEFAULT_THRESHOLD", "EXPLAINER_NAMES",
                     "ExplainSettings", "parse_explainers"), "settings"),
    "run_explain": "pipeline",
    "resolve_items": "inputs",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
