"""``flexi-export compress`` and ``flexi-export evaluate`` end to end, and their one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoConfig

from flexi_export.checkpoint import load_flexi
from flexi_export.cli import main
from flexi_export.compress.data import load_corpus, token_sequences
from flexi_export.compress.evaluate import evaluate_model
from flexi_export.layouts import layout_for
from flexi_export.stats import count_parameters, dense_parameters

FAST = ["--calib-sequences", "4", "--seq-len", "32", "--eval-sequences", "4", "--batch-size", "4", "--quiet"]


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("error: ") and expected in last, last


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, model_dir, text_dir):
    out = tmp_path_factory.mktemp("runs") / "flexi"
    args = ["compress", model_dir, "--out", out, "--ratio", "0.3", "--rank", "4", "--ofn", "rms"]
    result = _run(*args, "--data", text_dir, "--tokens", 4 * 32 * 6, *FAST)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_compress_writes_a_checkpoint_and_a_report(compressed, model_dir, text_dir, tokenizer):
    out, output = compressed
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "flexi_plan.json", "model.safetensors", "tokenizer.json"} <= names
    assert {"compress_report.json", "compress_report.md"} <= names
    assert not out.with_name(out.name + ".ckpt").exists()  # default checkpoints are removed after success
    report = json.loads((out / "compress_report.json").read_text())
    model = load_flexi(out)
    dims = layout_for("llama").dims(AutoConfig.from_pretrained(model_dir))
    stored = count_parameters(model).unique_params
    assert report["ratio"]["achieved"] == pytest.approx(1 - stored / dense_parameters(dims), abs=1e-12)
    assert report["ratio"]["achieved"] >= 0.3 and report["method"] == "flexi"
    assert len(report["blocks"]) == 6 and all(r["block_influence"] is not None for r in report["blocks"])
    replaced = [r for r in report["blocks"] if r["fate"] == "replaced"]
    assert [r["block"] for r in replaced] == report["pruned"]
    assert all(r["source"] is not None and r["distance"] is not None for r in replaced)
    assert report["recovery"]["steps"] == 6 and report["recovery"]["tokens"] == 6 * 4 * 32
    assert {"dense", "before_recovery", "after_recovery"} <= set(report["evaluation"])
    rows = token_sequences(tokenizer, list(load_corpus(text_dir).heldout), 32, 4)
    again = evaluate_model(model, rows, progress=False)  # the saved model is the evaluated one
    assert again.perplexity == pytest.approx(report["evaluation"]["after_recovery"]["perplexity"], rel=1e-5)
    assert "| block | BI | fate | source | distance |" in (out / "compress_report.md").read_text()
    assert "after recovery" in output and "ratio" in output


def test_evaluate_cli_on_hf_folder_and_flexi_checkpoint(compressed, model_dir, text_dir, tmp_path):
    out, _ = compressed
    report = json.loads((out / "compress_report.json").read_text())
    for path, key in ((model_dir, "dense"), (out, "after_recovery")):
        target = tmp_path / f"{key}.json"
        args = ["evaluate", path, "--data", text_dir, "--seq-len", "32", "--max-sequences", "4", "--json", target]
        result = _run(*args, "--quiet")
        assert result.exit_code == 0, result.output
        body = json.loads(target.read_text())
        assert body["perplexity"] == pytest.approx(report["evaluation"][key]["perplexity"], rel=1e-5)
        assert body["is_flexi"] == (key != "dense") and body["tokens"] == 4 * 31
        assert f"perplexity {body['perplexity']:.4f}" in result.output


def test_shortgpt_removes_the_same_blocks(compressed, model_dir, text_dir, tmp_path):
    flexi = json.loads((compressed[0] / "compress_report.json").read_text())
    out = tmp_path / "short"
    result = _run(
        "compress",
        model_dir,
        "--out",
        out,
        "--ratio",
        "0.3",
        "--rank",
        "4",
        "--ofn",
        "rms",
        "--method",
        "shortgpt",
        "--data",
        text_dir,
        "--tokens",
        1000,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compress_report.json").read_text())
    assert report["pruned"] == flexi["pruned"] and report["recovery"]["steps"] == 0
    assert load_flexi(out).config.num_hidden_layers == 6 - len(report["pruned"])


def test_extension_only_run(model_dir, text_dir, tmp_path):
    out = tmp_path / "ext"
    result = _run(
        "compress",
        model_dir,
        "--out",
        out,
        "--extend",
        "1,3",
        "--rank",
        "2",
        "--data",
        text_dir,
        "--tokens",
        4 * 32 * 2,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "compress_report.json").read_text())
    assert report["extended_after"] == [1, 3] and report["ratio"]["achieved"] < 0
    assert report["recovery"]["config"]["loss"]["ce"] == 1.0  # continued pretraining by default
    before = report["evaluation"]["before_recovery"]["perplexity"]
    assert before == pytest.approx(report["evaluation"]["dense"]["perplexity"], rel=1e-6)  # identity at step 0
    assert load_flexi(out).config.num_hidden_layers == 8


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--ratio", "0"], "strictly between 0 and 1"),
        (["--ratio", "1"], "strictly between 0 and 1"),
        (["--ratio", "0.97"], "unreachable"),
        (["--ratio", "0.3", "--rank", "100"], "larger than the matrices allow"),
        (["--num-blocks", "6"], "between 1 and 5 can be pruned"),
        (["--ratio", "0.3", "--data", "/nonexistent/text"], "data path not found"),
        ([], "nothing to do"),
        (["--extend", "9"], "block 9 does not exist"),
        (["--ratio", "0.3", "--device", "cuda"], "no CUDA GPU"),
    ],
)
def test_bad_input_is_a_one_line_error(model_dir, tmp_path, args, expected):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _assert_error(_run("compress", model_dir, "--out", tmp_path / "o", *args, *FAST), expected)


def test_empty_data_folder_flexi_input_and_existing_output(model_dir, compressed, tmp_path):
    (tmp_path / "empty").mkdir()
    result = _run("compress", model_dir, "--out", tmp_path / "o", "--ratio", "0.3", "--data", tmp_path / "empty", *FAST)
    _assert_error(result, "holds no .txt or .jsonl files")
    result = _run("compress", compressed[0], "--out", tmp_path / "o", "--ratio", "0.3", *FAST)
    _assert_error(result, "is a Flexi checkpoint")
    result = _run("compress", model_dir, "--out", compressed[0], "--ratio", "0.3", *FAST)
    _assert_error(result, "exists and is not empty")
    _assert_error(_run("compress", tmp_path / "missing", "--out", tmp_path / "o", "--ratio", "0.3"), "no such file")
    _assert_error(_run("evaluate", model_dir, "--data", tmp_path / "empty", "--quiet"), "holds no .txt")
