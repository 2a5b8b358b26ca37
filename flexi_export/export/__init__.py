"""ONNX export: a KV-cache decoder graph built from the plan, every shared weight one initializer.

Entry points: :func:`export_onnx` (an in-memory model) and :func:`export_folder` (a Flexi checkpoint or an
HF folder). See ``docs/export.md`` for the bundle layout and the I/O contract.
"""

from flexi_export.export.bundle import Bundle
from flexi_export.export.exporter import SUPPORTED_DTYPES, SUPPORTED_OPSETS, ExportOptions, export_folder, export_onnx

__all__ = ["SUPPORTED_DTYPES", "SUPPORTED_OPSETS", "Bundle", "ExportOptions", "export_folder", "export_onnx"]
