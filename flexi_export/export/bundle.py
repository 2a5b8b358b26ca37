"""The exported bundle: its files besides the graph, and :class:`Bundle` to open one.

```
<bundle>/
  config.json  generation_config.json  tokenizer files   # standard model_type, num_hidden_layers = executed
  genai_config.json                                     # onnxruntime-genai; decoder.filename = onnx/model.onnx
  flexi_plan.json  manifest.json  reference.npz
  onnx/model.onnx  onnx/model.onnx_data
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PreTrainedModel

from flexi_export.export.io_spec import IOSpec
from flexi_export.export.manifest import load_manifest
from flexi_export.export.reference import REFERENCE_NAME, ReferenceCase, load_reference
from flexi_export.layouts import ModelDims
from flexi_export.plan import BlockPlan

ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
_TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16"}


@dataclass(frozen=True)
class Bundle:
    """An exported bundle folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open a bundle folder (``InputError`` if it has no valid ``manifest.json``)."""
        path = Path(path)
        return cls(path=path, manifest=load_manifest(path))

    @property
    def onnx_path(self) -> Path:
        """``onnx/model.onnx``."""
        return self.path / ONNX_DIR / MODEL_FILE

    @property
    def data_path(self) -> Path:
        """``onnx/model.onnx_data``."""
        return self.path / ONNX_DIR / DATA_FILE

    @property
    def dtype(self) -> str:
        """``fp32`` or ``fp16``."""
        return str(self.manifest["dtype"])

    def reference(self) -> list[ReferenceCase]:
        """The golden cases of ``reference.npz``."""
        return load_reference(self.path / REFERENCE_NAME)

    def plan(self) -> BlockPlan:
        """The plan the bundle was built from."""
        return BlockPlan.load(self.path / "flexi_plan.json")


def pad_token_id(model: PreTrainedModel, tokenizer: Any | None) -> int:
    """The id used for left padding: the config's, the tokenizer's, then EOS, then 0."""
    for value in (
        getattr(model.config, "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
        _first(getattr(model.config, "eos_token_id", None)),
    ):
        if isinstance(value, int) and 0 <= value < model.config.vocab_size:
            return value
    return 0


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and value else value


def write_model_files(folder: Path, model: PreTrainedModel, tokenizer: Any | None, dtype: str) -> None:
    """``config.json`` (standard model_type, executed blocks), ``generation_config.json``, tokenizer files."""
    config = model.config
    config.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["num_hidden_layers"] = config.num_hidden_layers
    data["architectures"] = data.get("architectures") or [type(model).__name__]
    data["dtype"] = _TORCH_DTYPE_NAMES[dtype]
    data["use_cache"] = True
    # transformers.js: "fp32" selects the file name onnx/model.onnx (its suffix for fp32 is empty; the graph's own
    # input metadata gives the float type), and the weights are in the external file onnx/model.onnx_data
    data["transformers.js_config"] = {"dtype": "fp32", "use_external_data_format": True}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        portable_tokenizer_config(folder)


#: ``tokenizer_class`` names only transformers >= 5 knows -> the name every client reads as "tokenizer.json as is"
_PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(folder: Path) -> None:
    """Make ``tokenizer_config.json`` loadable by the clients' own transformers versions.

    transformers 5 saves a plain fast tokenizer as ``"tokenizer_class": "TokenizersBackend"``, a class that
    transformers 4.x (which optimum-onnx pins) does not have: ``AutoTokenizer`` raises there. The same
    tokenizer is ``PreTrainedTokenizerFast`` in 4.x, and transformers 5 loads that name as ``TokenizersBackend``;
    transformers.js and onnxruntime-genai read ``tokenizer.json`` either way.
    """
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    name = data.get("tokenizer_class")
    if name in _PORTABLE_TOKENIZER_CLASSES:
        data["tokenizer_class"] = _PORTABLE_TOKENIZER_CLASSES[name]
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def genai_config(model: PreTrainedModel, dims: ModelDims, io: IOSpec, pad_id: int) -> dict[str, Any]:
    """``genai_config.json`` for onnxruntime-genai (concat KV cache: ``past_present_share_buffer`` false)."""
    config = model.config
    eos = getattr(config, "eos_token_id", None)
    bos = getattr(config, "bos_token_id", None)
    return {
        "model": {
            "type": config.model_type,
            "bos_token_id": bos if bos is not None else pad_id,
            "eos_token_id": eos if eos is not None else pad_id,
            "pad_token_id": pad_id,
            "context_length": dims.max_position_embeddings,
            "vocab_size": dims.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": f"{ONNX_DIR}/{MODEL_FILE}",
                "head_size": dims.head_dim,
                "hidden_size": dims.hidden_size,
                "num_attention_heads": dims.num_heads,
                "num_hidden_layers": io.num_layers,
                "num_key_value_heads": dims.num_kv_heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": dims.max_position_embeddings,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
