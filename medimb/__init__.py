"""medimb: class-imbalanced medical image classification with 3D MRI support, on MONAI."""

__version__ = "0.1.0"
