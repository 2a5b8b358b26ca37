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

Session modes: ``recommended`` (the manifest's options), ``default`` (onnxruntime's defaults: prepacking on),
``no-prepack`` (``session.disable_prepacking=1``) and ``prepacked`` (the model saved by ``flexi_prepack.py``
with onnxruntime's packed weights as external data, loaded with the manifest's options).

Command line (prints JSON):  python flexi_device.py probe --bundle B [--mode MODE] [--threads N]
                             python flexi_device.py replay --bundle B [--mode MODE] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20
PROC = Path("/proc/self")
#: Session modes (see the module docstring).
MODES = ("recommended", "default", "no-prepack", "prepacked")
_NP_DTYPES = {"FLOAT": np.float32, "FLOAT16": np.float16, "INT64": np.int64}


# ------------------------------------------------------------------------------------------------ running
_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
ONNX_RELATIVE = Path("onnx") / "model.onnx"
REFERENCE_NAME = "reference.npz"


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """transformers' position ids for a (left-padded) mask: ``cumsum - 1``, padding positions set to 1."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def session_options(
    disable_prepacking: bool = True,
    threads: int | None = 2,
    optimized_model: str | None = None,
    config_entries: dict[str, str] | None = None,
) -> Any:
    """onnxruntime ``SessionOptions``: prepacking off (the manifest's recommendation: weights stay mapped) unless
    asked otherwise, a fixed thread count, quiet logs, optionally saving the optimized graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if disable_prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # keep the hardware-specific-optimisation warnings out of user output
    if optimized_model is not None:
        options.optimized_model_filepath = optimized_model
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OrtDecoder:
    """One onnxruntime CPU session over a decoder graph with a KV cache.

    Reads the I/O contract from the session itself (names, kv heads, head_dim, dtype), so it runs any graph that
    follows optimum's ``text-generation-with-past`` layout, not only flexi-export's.
    """

    def __init__(self, model_path: str | Path, options: Any | None = None, threads: int | None = 2) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if path.is_dir():
            path = path / ONNX_RELATIVE
        options = options if options is not None else session_options(True, threads)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.float_dtype = _ORT_FLOATS[self.past[0].type] if self.past else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def vocab_size(self) -> int | None:
        """The logits' last dimension when the graph fixes it (None when symbolic)."""
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        return logits.shape[-1] if isinstance(logits.shape[-1], int) else None

    def kv_bytes(self, batch: int, length: int) -> int:
        """Bytes of the whole KV cache at ``length`` tokens, from the session's input metadata."""
        item = np.dtype(self.float_dtype).itemsize
        return sum(batch * int(i.shape[1]) * length * int(i.shape[3]) * item for i in self.past)

    @property
    def num_layers(self) -> int:
        """Executed blocks (one key and one value cache each)."""
        return len(self.past) // 2

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length caches for the first step (kv heads and head_dim from the input metadata)."""
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=self.float_dtype) for i in self.past}

    def run(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: ``(logits, {present name: array})``."""
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
        }
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        feeds.update(self.empty_past(input_ids.shape[0]) if past is None else past)
        named = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        logits = named.pop("logits")
        return logits, named

    @staticmethod
    def as_past(present: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feed a step's ``present.*`` outputs back as the next step's ``past_key_values.*``."""
        return {name.replace("present.", "past_key_values.", 1): value for name, value in present.items()}

    def greedy(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int, position_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prefill, then ``steps`` greedy tokens with the cache (never stopping at EOS).

        Returns ``(prefill logits, tokens [B, steps])``.
        """
        pos = position_ids_from_mask(attention_mask) if position_ids is None else position_ids
        logits, present = self.run(input_ids, attention_mask, pos)
        prefill, mask, tokens = logits, attention_mask, []
        for step in range(steps):
            token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            tokens.append(token)
            if step == steps - 1:
                break
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            pos = pos[:, -1:] + 1
            logits, present = self.run(token, mask, pos, self.as_past(present))
        return prefill, np.concatenate(tokens, axis=1) if tokens else np.zeros((input_ids.shape[0], 0), np.int64)


# ------------------------------------------------------------------------------------------------ the bundle
class Bundle:
    """A bundle folder: manifest, graph, data file (``reference.npz`` beside them)."""

    def __init__(self, path: str | Path, plain: bool = False) -> None:
        """``plain``: accept a folder without ``manifest.json`` holding ``model.onnx`` (or ``onnx/model.onnx``)
        and, when it has one, its ``model.onnx_data``, e.g. an ``optimum-cli export onnx`` output, so that other
        exporters' models are measured by this same runner (no manifest: onnxruntime's default options)."""
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if manifest.is_file():
            self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        elif plain and (found := _plain_manifest(self.path)) is not None:
            self.manifest = found
        else:
            raise SystemExit(f"error: {self.path} is not a flexi-export bundle (manifest.json missing)")
        self.model = self.path / self.manifest["files"]["model"]
        self.data = self.path / self.manifest["files"]["data"] if self.manifest["files"]["data"] else None
        self.io = self.manifest.get("io")
        prepacked = self.manifest.get("prepacked") or {}
        self.prepacked_model = self.path / prepacked["model"] if prepacked else None
        self.prepacked_data = self.path / prepacked["data"] if prepacked else None

    def files_for(self, mode: str) -> tuple[Path, Path | None]:
        """``(graph, weight data file)`` a session in ``mode`` loads (``prepacked``: the saved prepacked model)."""
        if mode != "prepacked":
            return self.model, self.data
        if self.prepacked_model is None or not self.prepacked_model.is_file():
            raise SystemExit(f"error: {self.path} has no prepacked model; run flexi_prepack.py (flexi-export prepack)")
        assert self.prepacked_data is not None
        return self.prepacked_model, self.prepacked_data

    def kv_bytes(self, batch: int, length: int) -> int:
        """Bytes of the whole KV cache (keys and values of every executed block) at ``length`` tokens."""
        if self.io is None:
            raise ValueError(f"{self.path} has no manifest: use OrtDecoder.kv_bytes")
        total = 0
        for spec in self.io["inputs"]:
            if spec["name"].startswith("past_key_values."):
                item = np.dtype(_NP_DTYPES[spec["dtype"]]).itemsize
                total += batch * int(spec["shape"][1]) * length * int(spec["shape"][3]) * item
        return total

    def options(self, mode: str, threads: int) -> Any:
        """``recommended`` and ``prepacked``: the manifest's session options; ``default``: onnxruntime's
        defaults (prepacking on); ``no-prepack``: the defaults with ``session.disable_prepacking=1``."""
        if mode in ("default", "no-prepack"):
            return session_options(disable_prepacking=mode == "no-prepack", threads=threads)
        if mode not in ("recommended", "prepacked"):
            raise ValueError(f"unknown session mode {mode!r}")
        entries = dict(self.manifest.get("session_options", {}).get("config_entries", {}))
        return session_options(disable_prepacking=False, threads=threads, config_entries=entries)


def _plain_manifest(folder: Path) -> dict[str, Any] | None:
    """The ``files`` part of a manifest for a plain ONNX folder, or None when it holds no ``model.onnx``."""
    for model in (folder / "model.onnx", folder / ONNX_RELATIVE):
        if model.is_file():
            data = model.with_name("model.onnx_data")
            rel = model.relative_to(folder).as_posix()
            return {"files": {"model": rel, "data": data.relative_to(folder).as_posix() if data.is_file() else None}}
    return None


# -------------------------------------------------------------------------------------------------- replay
@dataclass(frozen=True)
class ReferenceCase:
    """One golden case of ``reference.npz`` (numpy arrays, batch first)."""

    name: str
    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    logits: np.ndarray
    greedy: np.ndarray


def load_reference(path: str | Path) -> list[ReferenceCase]:
    """The cases of a ``reference.npz`` (``cases`` names, then ``{case}.{field}`` arrays)."""
    with np.load(path, allow_pickle=False) as data:
        return [
            ReferenceCase(str(n), *(data[f"{n}.{f}"] for f in ("input_ids", "attention_mask", "position_ids",
                                                               "logits", "greedy")))
            for n in data["cases"]
        ]  # fmt: skip


def compare_prefill(
    logits: np.ndarray, case: ReferenceCase, tolerances: dict[str, Any]
) -> tuple[float, float, list[str]]:
    """Prefill logits vs a case on its real (non-padding) positions: ``(max abs diff, top-1 agreement,
    problems)``; fp32 is held to ``|a - b| <= atol + rtol |b|``, every dtype to the top-1 agreement bound."""
    keep = case.attention_mask.astype(bool)
    ours, ref = logits.astype(np.float32)[keep], case.logits[keep]
    diff = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
    agreement = float(np.mean(ours.argmax(-1) == ref.argmax(-1))) if ref.size else 1.0
    problems = []
    atol, rtol = tolerances.get("logits_atol"), tolerances.get("logits_rtol") or 0.0
    if atol is not None and np.any(np.abs(ours - ref) > atol + rtol * np.abs(ref)):
        problems.append(f"{case.name}: prefill logits differ by up to {diff:.3g} (atol {atol}, rtol {rtol})")
    minimum = tolerances.get("top1_agreement_min")
    if minimum is not None and agreement < minimum:
        problems.append(f"{case.name}: top-1 agreement {agreement:.3f} < {minimum}")
    return diff, agreement, problems


def replay(
    bundle: str | Path,
    tolerances: dict[str, Any] | None = None,
    threads: int = 2,
    greedy: bool = True,
    mode: str = "recommended",
) -> dict[str, Any]:
    """Replay ``reference.npz``: per case, max |logits diff| on real positions, top-1 agreement and (with
    ``greedy``) whether the greedy tokens are identical. Tolerances default to the manifest's."""
    path = Path(bundle)
    if tolerances is None:
        tolerances = Bundle(path).manifest["tolerances"]
    model, options = path, None
    if (path / "manifest.json").is_file():
        described = Bundle(path)
        model, options = described.files_for(mode)[0], described.options(mode, threads)
    decoder = OrtDecoder(model, options, threads)
    cases, problems = [], []
    for case in load_reference(path / REFERENCE_NAME):
        steps = case.greedy.shape[1] if greedy else 0
        logits, tokens = decoder.greedy(case.input_ids, case.attention_mask, steps, case.position_ids)
        diff, agreement, found = compare_prefill(logits, case, tolerances)
        row = {"case": case.name, "max_abs_logits_diff": diff, "top1_agreement": agreement}
        if greedy:
            row.update(greedy_identical=bool(np.array_equal(tokens, case.greedy)), greedy_tokens=int(case.greedy.size))
            if tolerances.get("greedy_tokens") == "identical" and not row["greedy_identical"]:
                found.append(f"{case.name}: greedy tokens differ from the PyTorch model's")
        cases.append(row)
        problems.extend(found)
    return {"cases": cases, "passed": not problems, "problems": problems}


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


#: Heap allowed per stored byte of an int4 weight onnxruntime prepacks (MLAS keeps per-block sums beside the
#: codes; a dequantized float copy would be 8x).
PACKED_FACTOR = 2


#: Ops that read an initializer only at the rows of the tokens seen (a node's name ends with its op's name).
LOOKUPS = ("Gather", "GatherBlockQuantized")


def matmul_read_bytes(manifest: dict[str, Any]) -> int:
    """Stored bytes of the weights one forward pass reads whole (MatMul, Gemm, MatMulNBits, norms...): every
    initializer with a consumer other than a row lookup. A table read only by lookups is touched only at the rows
    of the tokens seen."""
    rows = manifest.get("initializers", [])
    return sum(r["bytes"] for r in rows if any(c.rsplit("/", 1)[-1] not in LOOKUPS for c in r["consumers"]))


def prepacked_bytes(manifest: dict[str, Any], released_only: bool = False) -> int:
    """Stored bytes of the weights onnxruntime packs onto the heap under the manifest's session options: those
    read by ``MatMulNBits`` (int4) when prepacking is on. ``released_only``: only those read by nothing else,
    whose mapped pages onnxruntime releases after packing (a tied int4 table is also gathered from the file), so
    they count against the heap and not against the data file's residency. 0 for every other bundle."""
    entries = manifest.get("session_options", {}).get("config_entries", {})
    if entries.get("session.disable_prepacking") == "1":
        return 0
    total = 0
    for row in manifest.get("initializers", []):
        packed = [c.endswith("/MatMulNBits") for c in row["consumers"]]
        if any(packed) and (all(packed) or not released_only):
            total += row["bytes"]
    return total


def _covered(maps: list[dict[str, int]]) -> int:
    """Bytes of the file covered by the mappings: small tensors packed together are mapped by several mappings
    that share pages, which are resident once (their Pss is split between the mappings)."""
    total, end = 0, 0
    for offset, size in sorted((m["offset"], m["size"]) for m in maps):
        total += max(0, offset + size - max(offset, end))
        end = max(end, offset + size)
    return total


def mapped_residency(data_file: Path) -> dict[str, Any]:
    """Rss and Pss summed over the mappings of ``data_file`` (``mapped``: the file bytes they cover, each page
    once), with each mapping's file offset and size."""
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
        "mapped": _covered(maps),
        "rss": sum(m["rss"] for m in maps),
        "pss": sum(m["pss"] for m in maps),
        "by_offset": sorted((m["offset"], m["size"], m["rss"], m["pss"]) for m in maps),
    }


def probe(
    bundle: Bundle, mode: str = "recommended", threads: int = 2, prefill: int = 128, decode: int = 32,
    prefill_runs: int = 1,
) -> dict:  # fmt: skip
    """Memory and speed of one session in *this* process (call it in a fresh process: see ``run_fresh``).

    ``prefill_runs`` > 1 repeats the prefill after the decode steps (memory figures are taken before): the first
    prefill also pays for faulting the weights in, the repeats (``prefill_ms_warm``) time the computation alone.
    """
    result: dict[str, Any] = {"mode": mode, "threads": threads, "prefill_tokens": prefill, "decode_steps": decode,
                              "platform": platform.platform(), "onnxruntime": _ort_version()}  # fmt: skip
    if not proc_available():
        result["skipped"] = f"memory figures need Linux /proc (this is {platform.system()}); timings only"
    model, data = bundle.files_for(mode)
    sample = (lambda: snapshot(data)) if proc_available() else (lambda: {})
    result["peak_reset"] = reset_peak() if proc_available() else False
    result["baseline"] = sample()
    start = time.perf_counter()
    decoder = OrtDecoder(model, bundle.options(mode, threads))
    result["load_s"] = time.perf_counter() - start
    result["after_load"] = sample()
    ids = np.random.default_rng(0).integers(3, _vocab(bundle, decoder), size=(1, prefill), dtype=np.int64)
    mask = np.ones_like(ids)
    pos = np.arange(prefill, dtype=np.int64)[None]
    start = time.perf_counter()
    logits, present = decoder.run(ids, mask, pos)
    result["prefill_ms"] = (time.perf_counter() - start) * 1000
    result["logits_bytes"] = int(logits.nbytes)  # the largest activation a prefill returns
    result["after_prefill"] = sample()
    first, times = logits, []
    for _ in range(decode):
        token = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        pos = pos[:, -1:] + 1
        start = time.perf_counter()
        logits, present = decoder.run(token, mask, pos, decoder.as_past(present))
        times.append(time.perf_counter() - start)
    result["decode_ms_per_token"] = float(np.median(times) * 1000) if times else None
    result["after_decode"] = sample()
    result["kv_cache_bytes"] = decoder.kv_bytes(1, prefill + decode)
    result["prefill_ms_warm"] = _time_prefills(decoder, ids, prefill_runs - 1)
    result["prefill_top1"] = first[0, -1].argmax().item()  # lets a caller check two exports compute alike
    return result


def _time_prefills(decoder: OrtDecoder, ids: np.ndarray, runs: int) -> list[float]:
    mask, pos, out = np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None], []
    for _ in range(max(0, runs)):
        start = time.perf_counter()
        decoder.run(ids, mask, pos)
        out.append((time.perf_counter() - start) * 1000)
    return out


def _vocab(bundle: Bundle, decoder: OrtDecoder) -> int:
    """The vocabulary size: from the manifest's I/O, the graph's logits shape, or ``config.json``."""
    if bundle.io is not None:
        logits = next(t for t in bundle.io["outputs"] if t["name"] == "logits")
        return int(logits["shape"][-1])
    if decoder.vocab_size is not None:
        return decoder.vocab_size
    return int(json.loads((bundle.path / "config.json").read_text())["vocab_size"])


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def run_fresh(bundle: str | Path, job: str, *args: str) -> dict[str, Any]:
    """Run ``job`` ("probe" or "replay") of this file in a fresh Python process (extra CLI ``args``) and return
    its JSON: memory figures must not include anything this process already holds."""
    import subprocess

    command = [sys.executable, str(Path(__file__).resolve()), job, "--bundle", str(bundle), *args]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{job} failed in a fresh process: {lines[-1]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=["probe", "replay"])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--mode", default="recommended", choices=list(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=128, help="probe: prompt tokens")
    parser.add_argument("--decode", type=int, default=32, help="probe: decode steps")
    parser.add_argument("--prefill-runs", type=int, default=1, help="probe: prefills to time (the first is cold)")
    parser.add_argument("--plain", action="store_true", help="probe: accept an ONNX folder without manifest.json")
    parser.add_argument("--no-greedy", action="store_true", help="replay: compare prefill logits only")
    parser.add_argument("--tolerances", default=None, help="replay: JSON tolerances (default: the manifest's)")
    args = parser.parse_args(argv)
    if args.job == "probe":
        out = probe(Bundle(args.bundle, args.plain), args.mode, args.threads, args.prefill, args.decode,
                    args.prefill_runs)  # fmt: skip
    else:
        tolerances = None if args.tolerances is None else json.loads(args.tolerances)
        out = replay(args.bundle, tolerances, args.threads, greedy=not args.no_greedy, mode=args.mode)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
