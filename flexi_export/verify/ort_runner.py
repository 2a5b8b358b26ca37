"""Drive an exported decoder with onnxruntime: prefill, decode steps with a past, greedy generation.

Reads the I/O contract from the session itself (names, kv heads, head_dim, dtype), so it runs any graph that
follows optimum's ``text-generation-with-past`` layout, not only ours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
ONNX_RELATIVE = Path("onnx") / "model.onnx"


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """transformers' position ids for a (left-padded) mask: ``cumsum - 1``, padding positions set to 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def session_options(disable_prepacking: bool = True, threads: int | None = 2, optimized_model: str | None = None):  # noqa: ANN201 (onnxruntime type)
    """onnxruntime ``SessionOptions`` as the manifest recommends (prepacking off: weights stay mapped)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if disable_prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # keep the hardware-specific-optimisation warnings out of user output
    if optimized_model is not None:
        options.optimized_model_filepath = optimized_model
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OrtDecoder:
    """One onnxruntime session over a decoder graph with a KV cache."""

    def __init__(self, model_path: str | Path, disable_prepacking: bool = True, threads: int | None = 2) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if path.is_dir():
            path = path / ONNX_RELATIVE
        self.session = ort.InferenceSession(
            str(path), session_options(disable_prepacking, threads), providers=["CPUExecutionProvider"]
        )
        inputs = self.session.get_inputs()
        self.past = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.float_dtype = _ORT_FLOATS[self.past[0].type] if self.past else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def num_layers(self) -> int:
        """Executed blocks (one key and one value cache each)."""
        return len(self.past) // 2

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length caches for the first step (kv heads and head_dim from the input metadata)."""
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=self.float_dtype) for i in self.past}

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: ``(logits, {present name: array})``."""
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        feeds.update(self.empty_past(input_ids.shape[0]) if past is None else past)
        outputs = self.session.run(None, feeds)
        named = dict(zip(self.output_names, outputs, strict=True))
        logits = named.pop("logits")
        return logits, named

    @staticmethod
    def as_past(present: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feed a step's ``present.*`` outputs back as the next step's ``past_key_values.*``."""
        return {name.replace("present.", "past_key_values.", 1): value for name, value in present.items()}

    def greedy(self, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int) -> np.ndarray:
        """``steps`` greedy tokens (``[B, steps]``), feeding the cache back each step; never stops at EOS."""
        pos = position_ids_from_mask(attention_mask)
        logits, present = self.run(input_ids, attention_mask, pos)
        mask = attention_mask
        tokens = []
        for step in range(steps):
            token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            tokens.append(token)
            if step == steps - 1:
                break
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            pos = pos[:, -1:] + 1
            logits, present = self.run(token, mask, pos, self.as_past(present))
        return np.concatenate(tokens, axis=1)
