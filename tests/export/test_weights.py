"""The initializer registry (sharing by identity, never by value) and the streamed external-data writer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flexi_export.export.external_data import ALIGNMENT, SMALL_ALIGNMENT, read_external, write_external_data
from flexi_export.export.external_data import external_initializer as to_proto
from flexi_export.export.weights import AS_IS, TRANSPOSED, WeightRegistry, stored_chunks


def _registry(*params: tuple[str, nn.Parameter], dtype: str = "fp32") -> WeightRegistry:
    return WeightRegistry({id(p): name for name, p in params}, dtype)


def test_one_parameter_used_twice_is_one_entry_and_equal_values_stay_two():
    shared = nn.Parameter(torch.randn(8, 4))
    zero_a, zero_b = nn.Parameter(torch.zeros(2, 4)), nn.Parameter(torch.zeros(2, 4))
    registry = _registry(("w", shared), ("a.lora_B", zero_a), ("b.lora_B", zero_b))
    assert registry.use(shared, "q_proj.weight", TRANSPOSED, "/l1/MatMul", 1) == "w"
    assert registry.use(shared, "q_proj.weight", TRANSPOSED, "/l2/MatMul", 2) == "w"
    assert registry.use(zero_a, "lora_B", TRANSPOSED, "/l2/lora_B", 2) == "a.lora_B"
    assert registry.use(zero_b, "lora_B", TRANSPOSED, "/l3/lora_B", 3) == "b.lora_B"
    entries = {e.name: e for e in registry.entries}
    assert list(entries) == ["w", "a.lora_B", "b.lora_B"]
    assert entries["w"].consumers == ["/l1/MatMul", "/l2/MatMul"] and entries["w"].consuming_blocks == {1, 2}
    assert entries["w"].shape == (4, 8) and entries["w"].torch_shape == (8, 4)


def test_a_tensor_read_in_two_layouts_is_a_bug():
    weight = nn.Parameter(torch.randn(8, 4))
    registry = _registry(("w", weight))
    registry.use(weight, "embed", AS_IS, "/Gather")
    with pytest.raises(RuntimeError, match="as_is and as transposed"):
        registry.use(weight, "lm_head", TRANSPOSED, "/MatMul")


@pytest.mark.parametrize("layout", [AS_IS, TRANSPOSED])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_chunked_conversion_equals_converting_the_whole_tensor(layout, dtype):
    weight = nn.Parameter(torch.randn(37, 53))
    parts = list(stored_chunks(weight, layout, dtype, chunk_bytes=500))
    assert len(parts) > 1 and all(p.flags.c_contiguous for p in parts)
    whole = weight.detach().t() if layout == TRANSPOSED else weight.detach()
    expected = whole.to(torch.float16 if dtype == "fp16" else torch.float32).numpy()
    np.testing.assert_array_equal(np.concatenate(parts), expected)


def test_external_data_is_aligned_hashed_and_reads_back(tmp_path):
    big = nn.Parameter(torch.randn(160, 128))  # 80 KiB: 64 KiB-aligned
    small = nn.Parameter(torch.randn(5))  # 20 bytes: page aligned
    matrix = nn.Parameter(torch.randn(64, 300))  # 75 KiB
    registry = _registry(("small", small), ("big", big), ("matrix", matrix))
    registry.use(small, "norm", AS_IS, "/n")
    registry.use(big, "embed", AS_IS, "/g")
    registry.use(matrix, "q_proj.weight", TRANSPOSED, "/m")
    path = tmp_path / "model.onnx_data"
    stored = write_external_data(path, registry)
    assert [t.offset for t in stored] == [0, ALIGNMENT, 3 * ALIGNMENT]  # 80 KiB at 64 KiB ends past 128 KiB
    assert stored[0].offset % SMALL_ALIGNMENT == 0
    assert path.stat().st_size == stored[-1].offset + stored[-1].length
    for tensor, expected in zip(stored, (small, big, matrix.t()), strict=True):
        values = read_external(path, to_proto(tensor, "model.onnx_data"))
        np.testing.assert_array_equal(values, expected.detach().numpy())
