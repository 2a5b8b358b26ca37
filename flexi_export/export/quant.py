"""Weight quantization for quantized bundles (numpy only): the layouts onnxruntime's kernels read as they are.

Two schemes, one per bundle dtype (see ``docs/export.md``, "Quantized bundles", for why and the measurements):

- ``int4``: blockwise round-to-nearest along the input dimension K, for ``com.microsoft::MatMulNBits``.
  A torch weight ``W [N, K]`` (``[out, in]``) becomes ``qweight`` uint8 ``[N, k_blocks, block_size / 2]``
  (two 4-bit codes per byte, the first in the low nibble), ``scales`` float32 ``[N, k_blocks]`` and, when
  asymmetric, ``zero_points`` uint8 ``[N, ceil(k_blocks / 2)]`` (packed like ``qweight``). Symmetric blocks
  store no zero points: MatMulNBits' default is 8. The rows are exactly the rows of ``W``, so the same bytes
  serve an embedding lookup (``Gather`` of rows, unpacked on the activations) and a tied LM head.
  ``dequantized = (code - zero_point) * scale``. An untied int4 embedding of a ``--target cpu`` bundle stores
  the same bytes as ``nbits_rows`` (``qweight [N, k_blocks * block_size / 2]``), the layout
  ``com.microsoft::GatherBlockQuantized`` reads (one node instead of the unpacking subgraph).
- ``int8``: per-output-channel symmetric int8 for the standard ``MatMulInteger`` (activations quantized per
  tensor at run time by ``DynamicQuantizeLinear``): ``qweight`` int8 ``[K, N]`` (the layout ``MatMulInteger``
  reads), ``scales`` float32 ``[N]``. An untied int8 embedding uses ``rows``: int8 ``[V, H]`` + ``scales [V]``.

Symmetric int4 follows onnxruntime's own quantizer (MLAS): the value of largest magnitude in a block maps to
code 0 (``scale = v / -8``), which uses all 16 codes. Asymmetric uses ``[min(x, 0), max(x, 0)]`` over 15 steps.
Every function works on one matrix at a time, in row chunks, so quantizing never needs a second copy of the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from flexi_export.errors import ExportError

QUANT_DTYPES = ("int4", "int8")
BLOCK_SIZES = (16, 32, 64, 128)
#: MatMulNBits ``accuracy_level``: 0 = unset (fp32 compute), 1 = fp32, 4 = int8 activations per block (fastest).
ACCURACY_LEVELS = (0, 1, 4)
#: Layouts a quantized matrix can be stored in (see the module docstring).
NBITS, COLUMNS, ROWS = "nbits", "int8_columns", "int8_rows"
#: An untied int4 embedding read by ``GatherBlockQuantized`` (``--target cpu``): NBITS's bytes, one row per token.
NBITS_ROWS = "nbits_rows"
#: float32 rows converted at a time (bounds the quantizer's temporaries to a few MiB per chunk).
_CHUNK_ELEMENTS = 4 * 1024 * 1024


@dataclass(frozen=True)
class QuantConfig:
    """How a quantized bundle stores its block matrices (and, optionally, the embedding / LM head)."""

    dtype: str = "int4"
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4
    quantize_embedding: bool = False

    @property
    def bits(self) -> int:
        """Bits per weight code."""
        return 4 if self.dtype == "int4" else 8

    @property
    def op(self) -> str:
        """The op that reads the block matrices."""
        return "MatMulNBits" if self.dtype == "int4" else "MatMulInteger"

    def validate(self) -> QuantConfig:
        """Raise :class:`ExportError` for an option the scheme does not have."""
        if self.dtype not in QUANT_DTYPES:
            raise ExportError(f"unsupported quantized dtype {self.dtype!r}; supported: {', '.join(QUANT_DTYPES)}")
        if self.dtype == "int4":
            if self.block_size not in BLOCK_SIZES:
                sizes = ", ".join(map(str, BLOCK_SIZES))
                raise ExportError(f"unsupported block size {self.block_size!r} for int4; supported: {sizes}")
            if self.accuracy_level not in ACCURACY_LEVELS:
                levels = ", ".join(map(str, ACCURACY_LEVELS))
                raise ExportError(f"unsupported accuracy level {self.accuracy_level!r}; supported: {levels}")
        elif not self.symmetric:
            raise ExportError("int8 weights are symmetric per output channel (MatMulInteger); drop --asymmetric")
        return self

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the manifest's ``quantization`` section); int8 fields that do not apply are None."""
        data = asdict(self)
        data.update(bits=self.bits, op=self.op)
        if self.dtype == "int8":
            data.update(block_size=None, accuracy_level=None, granularity="per output channel")
        else:
            data["granularity"] = f"blocks of {self.block_size} along the input dimension"
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantConfig:
        """The config recorded in a manifest."""
        return cls(
            dtype=data["dtype"],
            block_size=int(data.get("block_size") or 32),
            symmetric=bool(data.get("symmetric", True)),
            accuracy_level=int(data["accuracy_level"]) if data.get("accuracy_level") is not None else 4,
            quantize_embedding=bool(data.get("quantize_embedding", False)),
        )


# ------------------------------------------------------------------------------------------ stored layouts
def part_layouts(layout: str, shape: tuple[int, ...], config: QuantConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{part: (stored shape, numpy dtype)}`` of a torch matrix ``shape = (N, K)`` stored in ``layout``."""
    n, k = shape
    if layout == NBITS:
        blocks = -(-k // config.block_size)
        parts = {
            "qweight": ((n, blocks, config.block_size * config.bits // 8), np.uint8),
            "scales": ((n, blocks), np.float32),
        }
        if not config.symmetric:
            parts["zero_points"] = ((n, -(-blocks * config.bits // 8)), np.uint8)
        return parts
    if layout == NBITS_ROWS:
        parts = part_layouts(NBITS, shape, config)
        rows = parts["qweight"][0]
        return parts | {"qweight": ((n, rows[1] * rows[2]), np.uint8)}
    if layout == COLUMNS:
        return {"qweight": ((k, n), np.int8), "scales": ((n,), np.float32)}
    if layout == ROWS:
        return {"qweight": ((n, k), np.int8), "scales": ((n,), np.float32)}
    raise ValueError(f"unknown quantized layout {layout!r}")


def quantize(weight: np.ndarray, layout: str, config: QuantConfig) -> dict[str, np.ndarray]:
    """Quantize one float matrix in torch layout ``[N, K]`` into the parts of ``layout`` (row chunk by chunk)."""
    n, k = weight.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, k))
    pieces = [
        _quantize_rows(np.asarray(weight[s : s + step], dtype=np.float32), layout, config) for s in range(0, n, step)
    ]
    parts = {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
    if layout == COLUMNS:  # MatMulInteger reads [K, N]: one transpose of the int8 codes (a quarter of fp32)
        parts["qweight"] = np.ascontiguousarray(parts["qweight"].T)
    if layout == NBITS_ROWS:
        parts["qweight"] = parts["qweight"].reshape(n, -1)
    return parts


def dequantize(parts: dict[str, np.ndarray], layout: str, config: QuantConfig, k: int) -> np.ndarray:
    """The float32 matrix ``[N, K]`` the parts stand for: what the runtime multiplies with."""
    if layout == NBITS_ROWS:
        q = parts["qweight"]
        return dequantize(parts | {"qweight": q.reshape(q.shape[0], parts["scales"].shape[1], -1)}, NBITS, config, k)
    if layout == NBITS:
        codes = unpack_codes(parts["qweight"], config.bits)  # [N, blocks, block_size]
        if config.symmetric:
            zero = np.float32(1 << (config.bits - 1))
        else:
            zero = unpack_codes(parts["zero_points"], config.bits)[:, : codes.shape[1], None].astype(np.float32)
        values = (codes.astype(np.float32) - zero) * parts["scales"][:, :, None]
        return values.reshape(codes.shape[0], -1)[:, :k]
    q = parts["qweight"].T if layout == COLUMNS else parts["qweight"]
    return q.astype(np.float32) * parts["scales"][:, None]


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes from bytes packed low bits first along the last axis (8 bits: the bytes themselves)."""
    if bits == 8:
        return packed
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _quantize_rows(rows: np.ndarray, layout: str, config: QuantConfig) -> dict[str, np.ndarray]:
    if layout in (NBITS, NBITS_ROWS):
        return _nbits(rows, config)
    # int8: symmetric per row (output channel): absmax -> 127, code 0 is exactly 0
    scale = np.abs(rows).max(axis=1) / 127.0
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint(rows * inverse[:, None]), -127, 127).astype(np.int8)
    return {"qweight": q, "scales": scale.astype(np.float32)}


def _nbits(rows: np.ndarray, config: QuantConfig) -> dict[str, np.ndarray]:
    """Blockwise codes of ``rows [n, K]`` (K zero-padded to whole blocks), packed for MatMulNBits."""
    n, k = rows.shape
    size, bits = config.block_size, config.bits
    blocks = -(-k // size)
    if blocks * size != k:
        rows = np.pad(rows, ((0, 0), (0, blocks * size - k)))
    x = rows.reshape(n, blocks, size)
    top = (1 << bits) - 1
    if config.symmetric:
        at = np.abs(x).argmax(axis=-1)[..., None]
        scale = np.take_along_axis(x, at, axis=-1)[..., 0] / -float(1 << (bits - 1))
        zero = np.full((n, blocks), 1 << (bits - 1), dtype=np.float32)
    else:
        low, high = np.minimum(x.min(axis=-1), 0.0), np.maximum(x.max(axis=-1), 0.0)
        scale = (high - low) / top
        zero = np.clip(np.rint(np.divide(-low, scale, out=np.zeros_like(scale), where=scale != 0)), 0, top)
    inverse = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    codes = np.clip(np.rint(x * inverse[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    parts = {"qweight": _pack(codes, bits), "scales": scale.astype(np.float32)}
    if not config.symmetric:
        parts["zero_points"] = _pack(zero.astype(np.uint8), bits)
    return parts


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes along the last axis, low bits first (an odd count is padded with a zero code)."""
    if bits == 8:
        return np.ascontiguousarray(codes)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))
