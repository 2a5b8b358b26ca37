"""Run a flexi-export bundle with onnxruntime and measure it: the on-device half of verification.

Standalone on purpose: it imports only the standard library, numpy and onnxruntime, so this file, the
``device_tests/`` folder and a bundle can be copied to a phone or a board with Python and run there. The
library's ``flexi-export verify`` runs this same file as a fresh subprocess, so the figures on the developer's
machine and on the device come from one implementation.

Two jobs:

- ``replay``: feed ``reference.npz`` (prompts, masks, positions computed at export time from the PyTorch model)
  and compare prefill logits (within the manifest's tolerances) and greedy tokens (identical in fp32).
- ``probe``: in a fresh process, take a memory baseline just before the session is created, create it with the
  manifest's recommended options (or onnxruntime's defaults), run a prefill and decode steps, and sample peak
  (VmHWM), anonymous (RssAnon), file-backed (RssFile) and PSS after load, after prefill and after decode, plus
  the residency (Rss/Pss) of the weight data file's mappings. Linux /proc only; elsewhere it says what it skipped.

Command line (prints JSON):  python flexi_device.py probe --bundle B [--mode recommended|default] [--threads N]
                             python flexi_device.py replay --bundle B [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20
PROC = Path("/proc/self")
_NP_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "INT64": np.int64}


# ------------------------------------------------------------------------------------------------ the bundle
class Bundle:
    """A bundle folder: manifest, graph, data file, reference cases."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise SystemExit(f"error: {self.path} is not a flexi-export bundle (manifest.json missing)")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        self.model = self.path / self.manifest["files"]["model"]
        self.data = self.path / self.manifest["files"]["data"]
        self.io = self.manifest["io"]

    @property
    def num_layers(self) -> int:
        return int(self.io["num_layers"])

    def input_spec(self, name: str) -> dict[str, Any]:
        return next(t for t in self.io["inputs"] if t["name"] == name)

    def cache_dtype(self) -> Any:
        return _NP_DTYPES[self.input_spec(self.io["past_key"] % 0)["dtype"]]

    def kv_shape(self, layer: int) -> tuple[int, int]:
        """(kv_heads, head_dim) of executed block ``layer`` (concrete ints in the graph's input shapes)."""
        shape = self.input_spec(self.io["past_key"] % layer)["shape"]
        return int(shape[1]), int(shape[3])

    def kv_bytes(self, batch: int, length: int) -> int:
        """Bytes of the whole KV cache (keys and values of every executed block) at ``length`` tokens."""
        item = np.dtype(self.cache_dtype()).itemsize
        return sum(2 * batch * h * length * d * item for h, d in (self.kv_shape(i) for i in range(self.num_layers)))

    def recommended_options(self) -> dict[str, str]:
        return dict(self.manifest.get("session_options", {}).get("config_entries", {}))


def make_session(bundle: Bundle, mode: str = "recommended", threads: int = 2) -> Any:
    """An onnxruntime CPU session with the manifest's recommended options or onnxruntime's defaults."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if mode == "recommended":
        for key, value in bundle.recommended_options().items():
            options.add_session_config_entry(key, value)
    elif mode != "default":
        raise ValueError(f"unknown session mode {mode!r}")
    return ort.InferenceSession(str(bundle.model), options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------- running
def empty_past(bundle: Bundle, batch: int) -> dict[str, np.ndarray]:
    """Zero-length cache tensors for the first step (every client does this)."""
    dtype = bundle.cache_dtype()
    feeds = {}
    for i in range(bundle.num_layers):
        heads, dim = bundle.kv_shape(i)
        for template in (bundle.io["past_key"], bundle.io["past_value"]):
            feeds[template % i] = np.zeros((batch, heads, 0, dim), dtype=dtype)
    return feeds


def step(
    session: Any, bundle: Bundle, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One forward: logits and the next step's past (present.* renamed to past_key_values.*)."""
    feeds = {"input_ids": ids, "attention_mask": mask, **past}
    names = {i.name for i in session.get_inputs()}
    if "position_ids" in names:
        feeds["position_ids"] = pos
    output_names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(output_names, session.run(None, feeds), strict=True))
    new_past = {}
    for i in range(bundle.num_layers):
        new_past[bundle.io["past_key"] % i] = outputs[bundle.io["present_key"] % i]
        new_past[bundle.io["past_value"] % i] = outputs[bundle.io["present_value"] % i]
    return outputs["logits"], new_past


def greedy(
    session: Any, bundle: Bundle, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prefill ``ids`` then ``steps`` greedy tokens with the KV cache: (prefill logits, tokens [B, steps])."""
    logits, past = step(session, bundle, ids, mask, pos, empty_past(bundle, ids.shape[0]))
    prefill = logits
    tokens = []
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens.append(nxt)
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        pos = pos[:, -1:] + 1
        logits, past = step(session, bundle, nxt, mask, pos, past)
    return prefill, np.concatenate(tokens, axis=1)


# -------------------------------------------------------------------------------------------------- replay
def replay(bundle: Bundle, threads: int = 2, mode: str = "recommended") -> dict[str, Any]:
    """Replay ``reference.npz``: per case, max |logits diff| on real (non-pad) positions, top-1 agreement,
    and whether the greedy tokens are identical; ``passed`` applies the manifest's tolerances."""
    tol = bundle.manifest["tolerances"]
    session = make_session(bundle, mode, threads)
    cases = []
    with np.load(bundle.path / "reference.npz", allow_pickle=False) as data:
        for name in (str(n) for n in data["cases"]):
            ids, mask, pos = (data[f"{name}.{k}"] for k in ("input_ids", "attention_mask", "position_ids"))
            expected, want_tokens = data[f"{name}.logits"], data[f"{name}.greedy"]
            logits, tokens = greedy(session, bundle, ids, mask, pos, want_tokens.shape[1])
            real = mask.astype(bool)
            got, ref = logits.astype(np.float32)[real], expected[real]
            diff = float(np.abs(got - ref).max())
            top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
            cases.append(
                {"case": name, "max_abs_logits_diff": diff, "top1_agreement": top1,
                 "greedy_identical": bool(np.array_equal(tokens, want_tokens)),
                 "greedy_tokens": int(want_tokens.size)}
            )  # fmt: skip
    return {"cases": cases, **_judge_replay(cases, tol)}


def _judge_replay(cases: list[dict[str, Any]], tol: dict[str, Any]) -> dict[str, Any]:
    problems = []
    atol, rtol = tol.get("logits_atol"), tol.get("logits_rtol") or 0.0
    for c in cases:
        if atol is not None and c["max_abs_logits_diff"] > atol * (1 + rtol / max(atol, 1e-12)):
            problems.append(f"{c['case']}: max |logits diff| {c['max_abs_logits_diff']:.3g} > {atol:g}")
        if c["top1_agreement"] < tol.get("top1_agreement_min", 1.0):
            problems.append(f"{c['case']}: top-1 agreement {c['top1_agreement']:.3f} < {tol['top1_agreement_min']}")
        if tol.get("greedy_tokens") == "identical" and not c["greedy_identical"]:
            problems.append(f"{c['case']}: greedy tokens differ from the PyTorch model's")
    return {"passed": not problems, "problems": problems}


# -------------------------------------------------------------------------------------------------- memory
def proc_available() -> bool:
    """True where /proc/self/status and smaps_rollup exist (Linux, Android)."""
    return (PROC / "status").is_file() and (PROC / "smaps_rollup").is_file()


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        (PROC / "clear_refs").write_text("5")
        return True
    except OSError:
        return False


def snapshot(data_file: Path | None = None) -> dict[str, Any]:
    """Memory figures of this process in bytes: VmHWM, VmRSS, RssAnon, RssFile, Pss (+ anon/file split), and
    the Rss/Pss of every mapping of ``data_file`` (the weights)."""
    out: dict[str, Any] = {}
    for line in (PROC / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    for line in (PROC / "smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if key in ("Pss", "Pss_Anon", "Pss_File"):
            out[key] = int(value.split()[0]) * 1024
    if data_file is not None:
        out["weights"] = mapped_residency(data_file)
    return out


def mapped_residency(data_file: Path) -> dict[str, Any]:
    """Rss and Pss summed over the mappings of ``data_file``, with each mapping's file offset and size."""
    target = str(data_file.resolve())
    maps: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    for line in (PROC / "smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = None
            if len(head) >= 6 and head[5] == target:
                start, end = (int(x, 16) for x in head[0].split("-"))
                current = {"offset": int(head[2], 16), "size": end - start, "rss": 0, "pss": 0}
                maps.append(current)
        elif current is not None and head and head[0] in ("Rss:", "Pss:"):
            current[head[0][:-1].lower()] = int(head[1]) * 1024
    return {
        "mappings": len(maps),
        "mapped": sum(m["size"] for m in maps),
        "rss": sum(m["rss"] for m in maps),
        "pss": sum(m["pss"] for m in maps),
        "by_offset": sorted((m["offset"], m["size"], m["rss"], m["pss"]) for m in maps),
    }


def probe(bundle: Bundle, mode: str = "recommended", threads: int = 2, prefill: int = 128, decode: int = 32) -> dict:
    """Memory and speed of one session in *this* process (call it in a fresh process: see ``main``)."""
    result: dict[str, Any] = {"mode": mode, "threads": threads, "prefill_tokens": prefill, "decode_steps": decode,
                              "platform": platform.platform(), "onnxruntime": _ort_version()}  # fmt: skip
    if not proc_available():
        result["skipped"] = f"memory figures need Linux /proc (this is {platform.system()}); timings only"
    sample = (lambda: snapshot(bundle.data)) if proc_available() else (lambda: {})
    result["peak_reset"] = reset_peak() if proc_available() else False
    result["baseline"] = sample()
    start = time.perf_counter()
    session = make_session(bundle, mode, threads)
    result["load_s"] = time.perf_counter() - start
    result["after_load"] = sample()
    vocab = int(bundle.manifest.get("source", {}).get("vocab_size") or _vocab_from_io(bundle))
    ids = np.random.default_rng(0).integers(3, vocab, size=(1, prefill), dtype=np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(prefill, dtype=np.int64)[None]
    start = time.perf_counter()
    logits, past = step(session, bundle, ids, mask, pos, empty_past(bundle, 1))
    result["prefill_ms"] = (time.perf_counter() - start) * 1000
    result["logits_bytes"] = int(logits.nbytes)  # the largest activation a prefill returns
    result["after_prefill"] = sample()
    times = []
    for _ in range(decode):
        nxt = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
        pos = pos[:, -1:] + 1
        start = time.perf_counter()
        logits, past = step(session, bundle, nxt, mask, pos, past)
        times.append(time.perf_counter() - start)
    result["decode_ms_per_token"] = float(np.median(times) * 1000) if times else None
    result["after_decode"] = sample()
    result["kv_cache_bytes"] = bundle.kv_bytes(1, prefill + decode)
    return result


def _vocab_from_io(bundle: Bundle) -> int:
    logits = next(t for t in bundle.io["outputs"] if t["name"] == "logits")
    return int(logits["shape"][-1])


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def run_fresh(bundle_path: str | Path, job: str, **kwargs: Any) -> dict[str, Any]:
    """Run ``job`` ("probe" or "replay") of this file in a fresh Python process and return its JSON."""
    import subprocess

    args = [sys.executable, str(Path(__file__).resolve()), job, "--bundle", str(bundle_path)]
    for key, value in kwargs.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed in a fresh process: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=["probe", "replay"])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--mode", default="recommended", choices=["recommended", "default"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    args = parser.parse_args(argv)
    bundle = Bundle(args.bundle)
    if args.job == "probe":
        out = probe(bundle, args.mode, args.threads, args.prefill, args.decode)
    else:
        out = replay(bundle, args.threads, args.mode)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
