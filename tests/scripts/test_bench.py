"""scripts/bench.py: the whole bench on a tiny random model (structure and consistency of its JSON and markdown),
the section writer, the timing helper, the caches, and probing a plain (manifest-less) ONNX folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # noqa: E402
import bench_models  # noqa: E402
import bench_report  # noqa: E402

OTHERS = "# Benchmarks\n\n## Compression quality (reference model)\n\nquality table\n"
QUANT = "## Quantized bundles (reference model)\n\nquant table\n"
OPTIMUM = (ROOT / ".venv-optimum" / "bin" / "optimum-cli").is_file()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """One real bench run on the tiny model, minimum repeats, written into a BENCHMARKS.md with other sections."""
    tmp = tmp_path_factory.mktemp("bench")
    md, out = tmp / "BENCHMARKS.md", tmp / "bench.json"
    md.write_text(OTHERS + "\n" + QUANT)
    argv = [
        "--models",
        "tiny",
        "--repeats",
        "1",
        "--prefill",
        "8",
        "--decode",
        "2",
        "--prefill-runs",
        "2",
        "--no-scaling",
        "--no-setup",
        "--work",
        str(tmp / "work"),
        "--markdown",
        str(md),
        "--json",
        str(out),
        "--write",
        *([] if OPTIMUM else ["--no-optimum"]),
    ]
    assert bench.main(argv) == 0
    return json.loads(out.read_text()), md.read_text(), tmp


@pytest.mark.slow
def test_tiny_bench_json_is_consistent(tiny_run: tuple[dict, str, Path]) -> None:
    result, _, _ = tiny_run
    body = result["models"]["tiny"]
    s = body["storage"]
    flexi, dense = s["flexi"], s["dense"]
    assert 0 < flexi["unique_weight_bytes"] <= flexi["data_file_bytes"] <= flexi["onnx_bytes"] <= flexi["folder_bytes"]
    assert flexi["unique_weight_bytes"] < dense["unique_weight_bytes"] <= dense["bytes_without_sharing"]
    assert flexi["matmul_read_bytes"] <= flexi["unique_weight_bytes"]
    expected = {"flexi", "dense", "dense_source", "torch_dense", "torch_flexi"} | ({"optimum"} if OPTIMUM else set())
    assert {key.split("|")[0] for key in body["runtime"]} == expected
    for key, cell in body["runtime"].items():
        assert cell["runs"] == 1 and cell["prefill_ms"] > 0 and cell["decode_ms_per_token"] > 0, key
        if not key.startswith("torch"):
            load, decode = cell["after_load"], cell["after_decode"]
            assert 0 < load["VmHWM"] <= decode["VmHWM"] and decode["RssAnon"] > 0 and decode["Pss"] > 0, key
            assert cell["kv_cache_bytes"] > 0
    ours = body["runtime"]["flexi|no-prepack/1t"]["after_decode"]
    assert 0 < ours["weights_pss"] <= ours["weights_mapped"]  # the data file is mapped and was read
    for found in body["exports"].values():
        assert found["wall_s"] > 0 and found["peak_rss_bytes"] > 0 and Path(found["path"]).is_dir()
    assert len(result["raw_runs"]) == len(body["runtime"])


@pytest.mark.slow
def test_tiny_bench_markdown_and_goals(tiny_run: tuple[dict, str, Path]) -> None:
    result, text, tmp = tiny_run
    assert text.startswith(OTHERS + "\n" + QUANT)  # other sections untouched, ours appended
    assert text.count(bench_report.BEGIN) == 1 and text.count(bench_report.END) == 1
    for heading in ("## Storage", "## Runtime memory", "## Speed", "## Export cost", "## Quality", "## Goals"):
        assert f"\n{heading} (Flexi bundles)\n" in text
    assert "Command: `.venv/bin/python scripts/bench.py --models tiny" in text and "shared" in text
    goals = {g["goal"] for g in result["goals"]}
    assert "Flexi data file <= 1.01x unique weight bytes" in goals
    assert any(g.startswith("Flexi decode <= 1.10x our dense") for g in goals)
    storage = next(g for g in result["goals"] if g["goal"].startswith("Flexi data file"))
    s = result["models"]["tiny"]["storage"]["flexi"]
    assert storage["value"] == pytest.approx(s["data_file_bytes"] / s["unique_weight_bytes"])
    # re-rendering from the JSON (--from-json) replaces the sections in place, with the same text
    md = tmp / "BENCHMARKS.md"
    argv = ["--from-json", str(tmp / "bench.json"), "--markdown", str(md), "--json", str(tmp / "again.json"), "--write"]
    assert bench.main(argv) == 0
    assert md.read_text() == text


def test_write_section_appends_then_replaces_only_its_own(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(OTHERS)
    first = (
        f"{bench_report.FIRST_HEADING}\n{bench_report.BEGIN}\nold\n## Goals (Flexi bundles)\nx\n{bench_report.END}\n"
    )
    bench_report.write_section(first, md)
    md.write_text(md.read_text() + "\n" + QUANT)
    second = first.replace("old", "new")
    bench_report.write_section(second, md)
    text = md.read_text()
    assert text == OTHERS + "\n" + second + "\n" + QUANT


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "nope"],
        ["--models", ""],
        ["--repeats", "0"],
        ["--decode", "0"],
        ["--ratio", "1.5"],
        ["--threads", "0"],
        ["--threads", "a"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.parse(argv)
    assert info.value.code == 2


def test_timed_reports_the_child_peak_and_failures(tmp_path: Path) -> None:
    grow = [sys.executable, "-c", "x = bytearray(200 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"]
    small = bench_models.timed([sys.executable, "-c", "pass"])
    big = bench_models.timed(grow)
    assert big["peak_rss_bytes"] >= small["peak_rss_bytes"] + 150 * 1024 * 1024
    assert big["wall_s"] > 0
    log = tmp_path / "log.txt"
    with pytest.raises(RuntimeError, match="boom"):
        bench_models.timed([sys.executable, "-c", "raise SystemExit('boom')"], log=log)


def test_cache_keys_follow_the_inputs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("1")
    before = bench_models.folder_key(tmp_path)
    assert bench_models.folder_key(tmp_path) == before
    (tmp_path / "a.txt").write_text("22")
    assert bench_models.folder_key(tmp_path) != before
    assert bench_models.key("x", 1) != bench_models.key("x", 2)
    made: list[Path] = []

    def make(tmp: Path) -> dict:
        made.append(tmp)
        tmp.mkdir()
        return {"wall_s": 1.0}

    first = bench_models._cached(tmp_path / "art", make)
    again = bench_models._cached(tmp_path / "art", make)
    assert len(made) == 1 and not first["cached"] and again["cached"] and again["wall_s"] == 1.0
    # a rebuild under a new key drops the same artifact's older keys, never another artifact's
    (tmp_path / "exp-old").mkdir()
    (tmp_path / "exp-other-old").mkdir()
    bench_models._cached(tmp_path / "exp-new", make)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("exp")) == ["exp-new", "exp-other-old"]


def test_probe_runs_a_plain_onnx_folder(tmp_path: Path) -> None:
    """A folder without manifest.json (optimum's layout) is probed by the same runner with ``--plain``."""
    from flexi_export.export import export_onnx
    from flexi_export.verify.runtime import device, run_fresh
    from tests.helpers import tiny_model

    bundle = export_onnx(tiny_model("llama"), tmp_path / "bundle", progress=False, check=False).path
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("model.onnx", "model.onnx_data"):
        (plain / name).write_bytes((bundle / "onnx" / name).read_bytes())
    with pytest.raises(SystemExit, match=r"manifest\.json missing"):
        device.Bundle(plain)
    assert device.Bundle(plain, plain=True).data == plain / "model.onnx_data"
    found = run_fresh(plain, "probe", "--plain", "--prefill", "4", "--decode", "2", "--prefill-runs", "2")
    ours = run_fresh(bundle, "probe", "--prefill", "4", "--decode", "2")
    assert found["prefill_top1"] == ours["prefill_top1"]
    assert found["kv_cache_bytes"] == ours["kv_cache_bytes"] > 0 and len(found["prefill_ms_warm"]) == 1
    assert found["after_decode"]["weights"]["mappings"] > 0
