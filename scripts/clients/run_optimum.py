"""Client: optimum's ``ORTModelForCausalLM`` (package ``optimum-onnx``), run in ``.venv-optimum``.

Loads the bundle exactly as a user would, ``ORTModelForCausalLM.from_pretrained(bundle, subfolder="onnx")``
(config.json and generation_config.json at the root, ``onnx/model.onnx`` + its external data), then runs
``generate()`` greedily on each reference case (the batched case is left-padded; optimum derives position ids
from the attention mask) and encodes/decodes with ``AutoTokenizer.from_pretrained(bundle)`` (transformers 4.x).

Usage: .venv-optimum/bin/python scripts/clients/run_optimum.py BUNDLE JOB   (prints one JSON line)
"""

from __future__ import annotations

import os
from importlib.metadata import version
from typing import Any

from common import Stopwatch, load_job, parse_args, run


def body(result: dict[str, Any]) -> None:
    args = parse_args(__doc__.splitlines()[0])
    job = load_job(args.job)
    # never reach for the Hub: the bundle is a local folder and the check must work offline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import onnxruntime
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    torch.set_num_threads(job["threads"])
    result["versions"] = {p: version(p) for p in ("optimum-onnx", "optimum", "transformers", "onnxruntime")}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = job["threads"]
    with Stopwatch() as load:
        model = ORTModelForCausalLM.from_pretrained(str(args.bundle), subfolder="onnx", session_options=options)
    result.update(loads=True, load_seconds=load.seconds)
    result["notes"].append(f"use_cache={model.can_use_cache}, kv head size {model.embed_size_per_head}")
    for case in job["cases"]:
        ids = torch.tensor(case["input_ids"], dtype=torch.long)
        mask = torch.tensor(case["attention_mask"], dtype=torch.long)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=job["new_tokens"],
            do_sample=False,
            num_beams=1,
            pad_token_id=job["pad_token_id"],
        )
        result["cases"].append({"name": case["name"], "tokens": out[:, ids.shape[1] :].tolist()})
    if job["texts"]:
        tokenizer = AutoTokenizer.from_pretrained(str(args.bundle))
        result["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "encode": [tokenizer(text)["input_ids"] for text in job["texts"]],
            "decode": [tokenizer.decode(ids) for ids in job["expected"]["encode"]],
        }


if __name__ == "__main__":
    raise SystemExit(run("optimum", body))
