"""Run exported bundles, unchanged, in the runtimes users already have, and print client x bundle results.

    .venv/bin/python scripts/clients/check_clients.py BUNDLE [BUNDLE ...] [--clients optimum,genai,...]
                                                      [--report DIR] [--no-setup] [--threads N] [--timeout S]

Clients (each a runner in this folder, in its own environment, created by ``setup_envs.sh`` unless
``--no-setup``): optimum (``ORTModelForCausalLM``), onnxruntime-genai (``og.Generator``), transformers.js
(``text-generation`` pipeline in Node) and onnxruntime's mobile format (``.ort``, Fixed and Runtime styles).

Every client gets the bundle's reference prompts as token ids (``reference.npz``: the single prompt and the
left-padded batch) and must produce the 16 greedy tokens the PyTorch model produced at export time. Clients stop
a row at EOS; torch's reference does not, so a row is compared up to and including the reference's first EOS.
Where a client exposes its tokenizer, it must also encode the reference texts (and a few harder ones) to the same
ids as the bundle's tokenizer (transformers 5, this venv) and decode the reference tokens to the same text.
Exit status 0 when every row passes, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NEW_TOKENS = 16


@dataclass(frozen=True)
class Client:
    """One client: how to start its runner and which environment ``setup_envs.sh`` must create for it."""

    name: str
    command: tuple[str, ...]
    env: str | None  # setup_envs.sh argument; None: the project's own venv


CLIENTS = (
    Client("optimum", (str(ROOT / ".venv-optimum/bin/python"), str(HERE / "run_optimum.py")), "optimum"),
    Client("onnxruntime-genai", (str(ROOT / ".venv-genai/bin/python"), str(HERE / "run_genai.py")), "genai"),
    Client("transformers.js", ("node", str(HERE / "run_transformersjs.mjs")), "js"),
    Client("ort-mobile", (sys.executable, str(HERE / "run_mobile.py")), None),
)
CLIENT_NAMES = {c.name: c for c in CLIENTS} | {"genai": CLIENTS[1], "js": CLIENTS[2], "mobile": CLIENTS[3]}

#: Texts beyond the reference prompts that exercise a byte-level tokenizer's edges: non-ASCII, runs of spaces,
#: tabs and newlines, digits, and special-token strings inside text.
EXTRA_TEXTS = (
    "naïve café — 日本語 🙂",
    "  two  spaces\n\n\ttab\r\nend ",
    "x = [1, 22, 333]  # 4444",
    "<s>text</s><pad>",
)


@dataclass
class Row:
    """One line of the table."""

    client: str
    bundle: str
    loads: bool
    tokens_identical: bool
    compared: str  # e.g. "48/48" tokens compared
    tokenizer: str  # "identical", "differs", "n/a"
    seconds: float | None
    error: str | None
    detail: str

    @property
    def passed(self) -> bool:
        """Loads, identical tokens, a tokenizer that agrees (where the client exposes one), no error."""
        return self.loads and self.tokens_identical and self.tokenizer != "differs" and not self.error


# ------------------------------------------------------------------------------------------------------ the job
def build_job(bundle: Path, threads: int) -> dict[str, Any]:
    """Prompts, greedy reference tokens, pad/EOS ids and tokenizer expectations for one bundle."""
    import numpy as np

    from flexi_export.export.reference import REFERENCE_TEXTS
    from flexi_export.verify.runtime import load_reference

    cases = load_reference(bundle / "reference.npz")
    config = json.loads((bundle / "config.json").read_text())
    expected_from, greedy = expected_greedy(bundle, cases, threads)
    generation = bundle / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = config.get("eos_token_id") if eos is None else eos
    padded = [c.input_ids[c.attention_mask == 0] for c in cases]
    pad_ids = sorted({int(v) for p in padded for v in p})
    job: dict[str, Any] = {
        "bundle": str(bundle),
        "new_tokens": NEW_TOKENS,
        "threads": threads,
        "pad_token_id": pad_ids[0] if pad_ids else int(config.get("pad_token_id") or 0),
        "eos_token_id": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        "cases": [
            {
                "name": c.name,
                "input_ids": c.input_ids.tolist(),
                "attention_mask": c.attention_mask.tolist(),
                "greedy": tokens[:, :NEW_TOKENS].astype(np.int64).tolist(),
            }
            for c, tokens in zip(cases, greedy, strict=True)
        ],
        "expected_from": expected_from,
        "texts": [],
        "expected": None,
    }
    if (bundle / "tokenizer.json").is_file():
        job["texts"] = [*REFERENCE_TEXTS, *EXTRA_TEXTS]
        job["expected"] = expected_tokenizer(bundle, job["texts"])
    return job


def expected_greedy(bundle: Path, cases: list[Any], threads: int) -> tuple[str, list[Any]]:
    """The tokens a client must produce: the PyTorch model's (``reference.npz``) when the manifest holds the bundle
    to them (fp32), else onnxruntime's own greedy run of the bundle (fp16 and quantized bundles may flip
    near-ties against torch, but every client runs the same graph and must agree with onnxruntime).

    onnxruntime runs with its default options, prepacking on, as every client does: int4 ``MatMulNBits`` with
    ``accuracy_level`` 4 computes with int8 activations only on prepacked weights, so prepacking changes an int4
    bundle's logits (enough to flip greedy steps of a random-weight model)."""
    from flexi_export.verify.runtime import OrtDecoder, session_options

    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("tolerances", {}).get("greedy_tokens") == "identical":
        return "torch", [c.greedy for c in cases]
    decoder = OrtDecoder(bundle, session_options(disable_prepacking=False, threads=threads))
    steps = NEW_TOKENS
    return "onnxruntime", [decoder.greedy(c.input_ids, c.attention_mask, steps, c.position_ids)[1] for c in cases]


def expected_tokenizer(bundle: Path, texts: list[str]) -> dict[str, Any]:
    """What the bundle's ``tokenizer.json`` gives, read by the ``tokenizers`` library itself: every client
    reads that file, and the exporter encoded the reference prompts with the same tokenizer. Decoding keeps
    special tokens (transformers' default)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    encode = [tokenizer.encode(t).ids for t in texts]
    return {
        "encode": encode,
        "decode": [tokenizer.decode(ids, skip_special_tokens=False) for ids in encode],
        "decode_skip": [tokenizer.decode(ids, skip_special_tokens=True) for ids in encode],
    }


def transformers_notes(bundle: Path, job: dict[str, Any]) -> list[str]:
    """A note when this venv's transformers (``AutoTokenizer``) reads the bundle's tokenizer differently from
    ``tokenizer.json`` (transformers 5 swaps in a model type's own tokenizer class, e.g. Qwen2Tokenizer's
    pre-tokenizer, for some model types)."""
    if job["expected"] is None:
        return []
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundle)
    differs = [
        t for t, ids in zip(job["texts"], job["expected"]["encode"], strict=True) if tokenizer(t)["input_ids"] != ids
    ]
    if not differs:
        return []
    return [
        f"{bundle.name}: transformers' AutoTokenizer ({type(tokenizer).__name__}) encodes {len(differs)} of "
        f"{len(job['texts'])} texts differently from tokenizer.json (first: {differs[0]!r})"
    ]


# ---------------------------------------------------------------------------------------------------- running
def run_client(client: Client, bundle: Path, job_path: Path, work: Path, timeout: float) -> dict[str, Any]:
    """Run one runner; its result is the last line of stdout (a crash or timeout becomes an error result)."""
    command = [*client.command, str(bundle), str(job_path)]
    if client.name == "ort-mobile":
        command += ["--work", str(work / "mobile")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        return {"client": client.name, "loads": False, "cases": [], "error": f"timed out after {timeout:.0f} s"}
    except OSError as exc:
        return {"client": client.name, "loads": False, "cases": [], "error": f"cannot start {command[0]}: {exc}"}
    (work / f"{client.name}.stderr.txt").write_text(done.stderr)
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        result = {"client": client.name, "loads": False, "cases": [], "error": f"exit {done.returncode}: {tail}"}
    result["wall_seconds"] = round(time.perf_counter() - start, 3)
    return result


# -------------------------------------------------------------------------------------------------- judging
def compare_rows(expected: list[list[int]], got: list[list[int]], eos: set[int]) -> tuple[bool, int, int, str]:
    """``(identical, compared, total, first difference)``: each row up to and including the reference's first
    EOS (a client may stop there or pad after it)."""
    if len(got) != len(expected):
        return False, 0, sum(map(len, expected)), f"{len(got)} rows instead of {len(expected)}"
    compared = total = 0
    for r, (want, have) in enumerate(zip(expected, got, strict=True)):
        stop = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))
        total += len(want)
        for i in range(stop):
            if i >= len(have):
                return False, compared, total, f"row {r}: stopped after {len(have)} tokens, expected {stop}"
            if have[i] != want[i]:
                return False, compared, total, f"row {r} token {i}: {have[i]} != {want[i]}"
            compared += 1
    return True, compared, total, ""


def judge_tokenizer(result: dict[str, Any], job: dict[str, Any]) -> tuple[str, str]:
    """``("identical" | "differs" | "n/a", detail)``."""
    got, want = result.get("tokenizer"), job.get("expected")
    if want is None:
        return "n/a", "bundle has no tokenizer"
    if got is None:
        return "n/a", "client exposes no tokenizer"
    decoded = want["decode_skip"] if got.get("decode_skips_special_tokens") else want["decode"]
    bad = [f"encode {t!r}" for t, a, b in zip(job["texts"], got["encode"], want["encode"], strict=True) if list(a) != b]
    bad += [f"decode {t!r}" for t, a, b in zip(job["texts"], got["decode"], decoded, strict=True) if a != b]
    return ("differs", "tokenizer differs on " + ", ".join(bad)) if bad else ("identical", "")


def judge(name: str, result: dict[str, Any], job: dict[str, Any], bundle: str) -> Row:
    """One row from one runner result (or one of its variants)."""
    eos = set(job["eos_token_id"])
    problems = [result["error"]] if result.get("error") else []
    identical, compared, total = bool(result.get("cases")), 0, 0
    by_name = {c["name"]: c["tokens"] for c in result.get("cases", [])}
    for case in job["cases"]:
        ok, n, t, why = compare_rows(case["greedy"], by_name.get(case["name"], []), eos)
        identical, compared, total = identical and ok, compared + n, total + t
        if why:
            problems.append(f"{case['name']}: {why}")
    tokenizer, why = judge_tokenizer(result, job)
    if tokenizer == "differs":
        problems.append(why)
    seconds = result.get("style_seconds") or result.get("wall_seconds", result.get("seconds"))
    loads = bool(result.get("loads"))
    detail = "; ".join(p for p in problems if p)
    return Row(name, bundle, loads, identical, f"{compared}/{total}", tokenizer, seconds, result.get("error"), detail)


def rows_for(result: dict[str, Any], job: dict[str, Any], bundle: str) -> list[Row]:
    """The client's row, plus one per variant (the mobile runner's Runtime-style ``.ort``)."""
    rows = [judge(result["client"], result, job, bundle)]
    for variant in result.get("variants", []):
        rows.append(judge(f"{result['client']} ({variant['name']})", {**variant, "tokenizer": None}, job, bundle))
    if rows[0].client == "ort-mobile":
        rows[0].client = "ort-mobile (Fixed)"
    return rows


def usability_summary(usability: dict[str, Any]) -> str:
    """``check_onnx_model_mobile_usability``'s verdicts in one line (its full output is in the report)."""
    lines = usability.get("verdicts", [])
    perform = [v.removeprefix("Model should perform well with ") for v in lines if v.startswith("Model should")]
    final = [v for v in lines if not v.startswith("Model should")]
    return "; ".join([*perform, *final]) or f"no verdict (exit {usability.get('returncode')})"


def table(rows: list[Row]) -> str:
    """A Markdown table: client x bundle, loads, tokens identical, tokenizer, seconds."""
    lines = [
        "| client | bundle | loads | tokens identical | compared | tokenizer | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = "" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(
            f"| {r.client} | {r.bundle} | {_yes(r.loads)} | {_yes(r.tokens_identical)} | {r.compared} "
            f"| {r.tokenizer} | {seconds} |"
        )
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="bundle folders written by `flexi-export export`")
    parser.add_argument("--clients", default="all", help="comma-separated subset (optimum,genai,js,mobile)")
    parser.add_argument("--report", type=Path, help="write the results here (table, JSON, logs, .ort files)")
    parser.add_argument("--no-setup", action="store_true", help="do not run setup_envs.sh first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per client (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per client run (default 600)")
    parser.add_argument("--write-job", type=Path, metavar="JOB", help="only write the job of the one BUNDLE here")
    args = parser.parse_args(argv)
    names = [c.name for c in CLIENTS] if args.clients == "all" else args.clients.split(",")
    unknown = [n for n in names if n not in CLIENT_NAMES]
    if unknown:
        parser.error(f"unknown client(s) {', '.join(unknown)}; choose from {', '.join(sorted(CLIENT_NAMES))}")
    args.selected = list(dict.fromkeys(CLIENT_NAMES[n] for n in names))
    missing = [
        str(b) for b in args.bundles if not (b / "manifest.json").is_file() or not (b / "reference.npz").is_file()
    ]
    if missing:
        parser.error(f"not a flexi-export bundle (no manifest.json / reference.npz): {', '.join(missing)}")
    if args.write_job and len(args.bundles) != 1:
        parser.error("--write-job takes exactly one bundle")
    return args


def setup(clients: list[Client]) -> float:
    """Create the clients' environments (idempotent); returns the seconds it took."""
    envs = [c.env for c in clients if c.env]
    start = time.perf_counter()
    if envs:
        subprocess.run([str(HERE / "setup_envs.sh"), *envs], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def check_bundle(
    bundle: Path, clients: list[Client], work: Path, args: argparse.Namespace
) -> tuple[list[Row], list[str]]:
    """Every selected client on one bundle: ``(rows, notes)``; raw results and the job are written to ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    job = build_job(bundle.resolve(), args.threads)
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    rows, notes = [], transformers_notes(bundle, job)
    if job["expected_from"] != "torch":
        notes.append(
            f"{bundle.name}: tokens compared with onnxruntime's greedy run (its manifest does not hold it "
            "to the PyTorch model's tokens)"
        )
    for client in clients:
        print(f"{bundle.name}: {client.name} ...", file=sys.stderr, flush=True)
        result = run_client(client, bundle.resolve(), job_path, work, args.timeout)
        (work / f"{client.name}.json").write_text(json.dumps(result, indent=1))
        rows.extend(rows_for(result, job, bundle.name))
        if result.get("usability"):
            notes.append(f"{bundle.name}: mobile usability: {usability_summary(result['usability'])}")
    return rows, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_job:
        args.write_job.write_text(json.dumps(build_job(args.bundles[0].resolve(), args.threads)))
        return 0
    setup_seconds = 0.0 if args.no_setup else setup(args.selected)
    report = args.report or Path(tempfile.mkdtemp(prefix="flexi-clients-"))
    rows: list[Row] = []
    notes: list[str] = []
    for i, bundle in enumerate(args.bundles):
        bundle_rows, bundle_notes = check_bundle(bundle, args.selected, report / f"{i}-{bundle.name}", args)
        rows.extend(bundle_rows)
        notes.extend(bundle_notes)
    text = table(rows)
    failures = [f"{r.client} on {r.bundle}: {r.detail}" for r in rows if not r.passed]
    summary = [f"environment setup {setup_seconds:.1f} s; " + ("all passed" if not failures else "FAILED:")]
    summary += [f"  {line}" for line in failures] + [f"note: {n}" for n in notes]
    print(text + "\n\n" + "\n".join(summary))
    if args.report:
        (report / "clients.md").write_text(text + "\n\n" + "\n".join(summary) + "\n")
        (report / "clients.json").write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in rows], indent=1))
        print(f"report: {report}", file=sys.stderr)
    else:
        shutil.rmtree(report, ignore_errors=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
