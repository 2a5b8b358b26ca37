"""Client: onnxruntime-genai (PyPI ``onnxruntime-genai``), run in ``.venv-genai``.

``og.Model(bundle)`` reads the exporter's ``genai_config.json`` (``decoder.filename`` = ``onnx/model.onnx``,
the cache from ``num_key_value_heads`` x ``head_size``), then an ``og.Generator`` greedy loop per reference case.
A batch is appended as one left-padded ``[B, L]`` array: genai derives the attention mask (and the position ids)
from ``pad_token_id``, so the case's padding must use the config's pad id. ``og.Tokenizer(model)`` reads
``tokenizer.json`` / ``tokenizer_config.json``.

Usage: .venv-genai/bin/python scripts/clients/run_genai.py BUNDLE JOB   (prints one JSON line)
"""

from __future__ import annotations

import json
from importlib.metadata import version
from typing import Any

from common import Stopwatch, load_job, parse_args, run


def right_padded(case: dict[str, Any], pad_id: int) -> list[list[int]]:
    """The case's prompts as genai reads a batch: real tokens first, ``pad_id`` after them.

    genai builds the attention mask and position ids of a batch from ``pad_token_id``, but only *trailing* pad
    tokens count as padding (it scans each row from the end, so that a prompt may contain the pad id); the
    pads of a left-padded row would be attended to as real tokens. Moving them to the end is the batch genai
    expects for the same prompts.
    """
    rows = [
        [t for t, m in zip(ids, mask, strict=True) if m]
        for ids, mask in zip(case["input_ids"], case["attention_mask"], strict=True)
    ]
    width = max(len(r) for r in rows)
    return [r + [pad_id] * (width - len(r)) for r in rows]


def generate(og: Any, model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens for one batch of right-padded prompts; genai stops a row at EOS (and pads it after)."""
    import numpy as np

    ids = np.asarray(prompts, dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=ids.shape[1] + new_tokens, batch_size=ids.shape[0])
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    steps: list[list[int]] = []
    while not generator.is_done() and len(steps) < new_tokens:
        generator.generate_next_token()
        steps.append([int(t) for t in generator.get_next_tokens()])
    return [list(row) for row in zip(*steps, strict=True)] if steps else [[] for _ in ids]


def body(result: dict[str, Any]) -> None:
    args = parse_args(__doc__.splitlines()[0])
    job = load_job(args.job)
    import onnxruntime_genai as og

    result["versions"] = {p: version(p) for p in ("onnxruntime-genai", "onnxruntime")}
    config = json.loads((args.bundle / "genai_config.json").read_text())
    pad = config["model"]["pad_token_id"]
    if pad != job["pad_token_id"]:
        result["notes"].append(f"genai_config pad_token_id {pad} != the reference padding id {job['pad_token_id']}")
    with Stopwatch() as load:
        model = og.Model(str(args.bundle))
    result.update(loads=True, load_seconds=load.seconds)
    for case in job["cases"]:
        tokens = generate(og, model, right_padded(case, pad), job["new_tokens"])
        result["cases"].append({"name": case["name"], "tokens": tokens})
    if job["texts"]:
        tokenizer = og.Tokenizer(model)
        result["tokenizer"] = {
            "class": "og.Tokenizer",
            "encode": [[int(t) for t in tokenizer.encode(text)] for text in job["texts"]],
            "decode": [tokenizer.decode(ids) for ids in job["expected"]["encode"]],
            "decode_skips_special_tokens": True,  # og.Tokenizer.decode has no option to keep them
        }


if __name__ == "__main__":
    raise SystemExit(run("onnxruntime-genai", body))
