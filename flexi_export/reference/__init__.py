"""The reference model: a small Llama trained here on the Python standard library's own text."""
