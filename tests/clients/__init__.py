"""Tests of scripts/clients: the bundle in optimum, onnxruntime-genai, transformers.js and onnxruntime mobile."""
