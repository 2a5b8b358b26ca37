"""The "Run it with ..." snippets of docs/clients.md run as written, each in its client, on an exported bundle.

Each snippet is the code block after a ``<!-- snippet: NAME -->`` marker. The test replaces only the bundle path
(the line that names ``graphs/my-bundle``) and checks that the snippet prints the greedy continuation the
PyTorch model produces for the same prompt.
Slow, and needs the clients' environments (``scripts/clients/setup_envs.sh``, as ``test_clients.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from flexi_export.export import export_onnx
from flexi_export.export.manifest import TOLERANCES
from flexi_export.export.reference import REFERENCE_TEXTS, torch_greedy
from tests.clients import models

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "clients.md"
PLACEHOLDER = "graphs/my-bundle"
#: snippet name -> (setup_envs.sh environment, command prefix, file suffix)
RUNNERS = {
    "optimum": ("optimum", [str(ROOT / ".venv-optimum/bin/python")], ".py"),
    "onnxruntime-genai": ("genai", [str(ROOT / ".venv-genai/bin/python")], ".py"),
    "transformers.js": ("js", ["node"], ".mjs"),
    "ort-mobile": (None, [sys.executable], ".py"),
}

pytestmark = pytest.mark.slow


def snippets(text: str) -> dict[str, str]:
    """``{name: code}`` for every ``<!-- snippet: name -->`` followed by a fenced code block."""
    pattern = re.compile(r"<!-- snippet: ([\w.-]+) -->\s*```\w*\n(.*?)```", re.S)
    return {name: code for name, code in pattern.findall(text)}


def test_the_doc_has_one_snippet_per_client_each_naming_the_bundle_and_the_first_reference_prompt():
    found = snippets(DOC.read_text())
    assert set(found) == set(RUNNERS)
    for name, code in found.items():
        assert PLACEHOLDER in code, name
        assert json.dumps(REFERENCE_TEXTS[0]) in code, name  # the prompt reference.npz's "single" case encodes


@pytest.fixture(scope="module")
def bundle_and_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The reference-architecture Flexi-30 bundle, and the text of the PyTorch model's 16 greedy tokens after the
    snippets' prompt."""
    model, tokenizer = models.reference_flexi30()
    root = tmp_path_factory.mktemp("snippets")
    path = export_onnx(model, root / "reference-flexi30", tokenizer=tokenizer, progress=False).path
    subprocess.run([str(ROOT / "scripts/clients/setup_envs.sh"), "optimum", "genai", "js"], check=True)
    return path, expected_text(model, path)


def expected_text(model: torch.nn.Module, bundle: Path) -> str:
    """torch's greedy continuation of REFERENCE_TEXTS[0] (whole: reference.npz cuts prompts to 16 tokens),
    decoded; every step decided by a margin far above the fp32 bundle's logits tolerance."""
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    ids = np.array([tokenizer.encode(REFERENCE_TEXTS[0]).ids], dtype=np.int64)
    _, tokens = torch_greedy(model, ids, np.ones_like(ids), 16)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.concatenate([ids, tokens], axis=1))).logits[0, ids.shape[1] - 1 : -1]
    top = logits.topk(2).values
    assert float((top[:, 0] - top[:, 1]).min()) > 100 * TOLERANCES["fp32"]["logits_atol"], "near-tie: change prompt"
    return tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_the_snippet_prints_the_reference_continuation(name: str, bundle_and_text: tuple[Path, str], tmp_path: Path):
    bundle, expected = bundle_and_text
    code = snippets(DOC.read_text())[name].replace(PLACEHOLDER, str(bundle))
    _, command, suffix = RUNNERS[name]
    script = tmp_path / f"snippet{suffix}"
    script.write_text(code)
    if name == "transformers.js":  # the snippet imports the package as a user's project would: node_modules beside it
        (tmp_path / "node_modules").symlink_to(ROOT / "scripts/clients/js/node_modules")
    # ort-mobile's snippet imports device_tests/flexi_device.py, the runner copied to a device beside the model
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "device_tests")}
    done = subprocess.run(
        [*command, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if name == "onnxruntime-genai":  # og's TokenizerStream drops bytes that are not UTF-8 (random weights emit some)
        expected = expected.replace("\ufffd", "")
    assert done.stdout.endswith(expected + "\n"), (done.stdout[-500:], expected)
