"""didbench harness: shared, method-agnostic machinery (data, backbone, training, evaluation)."""

__version__ = "0.1.0"
