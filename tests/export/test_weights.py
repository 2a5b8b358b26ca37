"""The initializer registry (sharing by identity, never by value) and the streamed external-data writer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from flexi_export.export.external_data import (
    ALIGNMENT,
    PAGE,
    SMALL_ALIGNMENT,
    alignment_for,
    plan_offsets,
    read_external,
    write_external_data,
)
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


def test_external_data_is_aligned_packed_hashed_and_reads_back(tmp_path):
    small = nn.Parameter(torch.randn(5))  # 20 bytes: packed on 64 bytes
    big = nn.Parameter(torch.randn(1025, 1024))  # 4 MiB + 4 KiB: on 64 KiB
    matrix = nn.Parameter(torch.randn(64, 300))  # 75 KiB: page aligned, right after big
    norm = nn.Parameter(torch.randn(7))  # registered after the matrix, placed in the gap before huge
    huge = nn.Parameter(torch.randn(1024, 1025))
    registry = _registry(("small", small), ("big", big), ("matrix", matrix), ("norm", norm), ("huge", huge))
    registry.use(small, "norm", AS_IS, "/n")
    registry.use(big, "embed", AS_IS, "/g")
    registry.use(matrix, "q_proj.weight", TRANSPOSED, "/m")
    registry.use(norm, "norm", AS_IS, "/n2")
    registry.use(huge, "down_proj.weight", AS_IS, "/d")
    path = tmp_path / "model.onnx_data"
    stored = write_external_data(path, registry)
    where = {t.entry.name: t for t in stored}
    assert [t.offset for t in stored] == sorted(t.offset for t in stored)  # file order
    assert where["big"].offset == 0  # nothing small to put before it
    assert where["matrix"].offset == where["big"].offset + where["big"].length  # already on a page
    assert where["small"].offset == _round(where["matrix"].offset + where["matrix"].length, SMALL_ALIGNMENT)
    assert where["norm"].offset == _round(where["small"].offset + where["small"].length, SMALL_ALIGNMENT)
    assert where["huge"].offset == _round(where["norm"].offset + where["norm"].length, ALIGNMENT)
    assert where["matrix"].offset % PAGE == 0
    assert path.stat().st_size == where["huge"].offset + where["huge"].length
    for name, expected in (("small", small), ("big", big), ("matrix", matrix.t()), ("norm", norm), ("huge", huge)):
        values = read_external(path, to_proto(where[name], "model.onnx_data"))
        np.testing.assert_array_equal(values, expected.detach().numpy())


def test_small_tensors_fill_alignment_gaps_so_the_file_is_its_unique_bytes():
    lengths = [5 * 1024 * 1024 + 4, 300, 1200, 4 * 1024 * 1024, 2000, 70_000]
    offsets = plan_offsets(lengths)
    spans = sorted(zip(offsets, lengths, strict=True))
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))  # no overlap
    assert all(o % alignment_for(n) == 0 for o, n in zip(offsets, lengths, strict=True))
    assert max(offsets[1], offsets[2], offsets[4]) < offsets[3]  # every small one went into the gap before 4 MiB
    end = max(o + n for o, n in spans)
    assert end == _round(lengths[0], ALIGNMENT) + lengths[3] + lengths[5]  # so they cost no byte of file


def _round(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
