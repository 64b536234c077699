"""medimb.explain: COAM and CAM/Grad-CAM attention maps, exported as overlays on the source scan.

>>> heat = COAM(model)(x)                      # (B, C, *S) -> (B, 1, *S) in [0, 1], 1 = attended
>>> heat = create_explainer("gradcam", model)(x, class_idx=1)

The exporter (:mod:`medimb.explain.export`) inverts maps to the source NIfTI grid; the pipeline
(:func:`run_explain`, ``medimb explain``) writes heatmaps, label maps, PNG previews, index.html,
predictions.csv and a 3D Slicer loader script.
"""

from medimb.explain.cam import CAMExplainer, FeatureMapClassifier, GradCAMExplainer, cam_classifier
from medimb.explain.coam import COAM, coam_from_features, upsample_to
from medimb.explain.export import (
    DEFAULT_THRESHOLD,
    forward_to_network_grid,
    invert_to_source,
    threshold_region,
    write_heatmap,
    write_label,
)
from medimb.explain.methods import DEFAULT_METHODS, METHODS, create_explainer, parse_methods
from medimb.explain.normalize import minmax_per_volume

__all__ = [
    "CAMExplainer", "COAM", "DEFAULT_METHODS", "DEFAULT_THRESHOLD", "FeatureMapClassifier",
    "GradCAMExplainer", "METHODS", "cam_classifier", "coam_from_features", "create_explainer",
    "forward_to_network_grid", "invert_to_source", "minmax_per_volume", "parse_methods", "threshold_region",
    "upsample_to", "write_heatmap", "write_label",
]
