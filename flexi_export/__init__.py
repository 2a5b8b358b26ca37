"""flexi-export: compress a Hugging Face decoder LLM FlexiGPT-style and export it to ONNX with every shared
weight stored, and resident, once."""

__version__ = "0.1.0"
