"""Real clients load a bundle unchanged (skipped when the client is not installed)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_onnxruntime_genai_generates_the_reference_greedy_tokens(family, bundle):
    og = pytest.importorskip("onnxruntime_genai")
    b = bundle(family, "mixed")
    case = b.reference()[0]
    prompt = case.input_ids[0].tolist()
    model = og.Model(str(b.path))  # reads genai_config.json -> onnx/model.onnx
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 16)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens: list[int] = []
    while not generator.is_done() and len(tokens) < 16:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    expected = case.greedy[0].tolist()
    eos = 2  # tests.helpers' configs; genai stops there, torch's reference does not
    assert tokens == expected[: len(tokens)] and (len(tokens) == 16 or tokens[-1] == eos)
