"""Verification of exported bundles: structure (sharing, no folded weights, values) and onnxruntime runs."""
