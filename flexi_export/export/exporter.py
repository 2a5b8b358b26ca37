"""``export_onnx``: a (Flexi) transformers model -> a bundle folder, written all-or-nothing.

Steps: check the options and the output folder; read the model against its plan (:func:`read_model`); build
the graph (:func:`build_decoder`); then, inside a temporary folder next to the output, stream the weights
into ``onnx/model.onnx_data``, write ``onnx/model.onnx``, the configs, the plan, ``reference.npz`` and
``manifest.json``, check the result with ``onnx.checker`` and onnxruntime, and rename the folder into place.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from tqdm import tqdm
from transformers import PreTrainedModel

from flexi_export import __version__
from flexi_export.errors import ExportError
from flexi_export.export import bundle as files
from flexi_export.export.bundle import Bundle
from flexi_export.export.check import check_onnx, check_reference
from flexi_export.export.clients import client_issues, compatibility, warn_client_issues
from flexi_export.export.decoder import DecoderGraph, build_decoder
from flexi_export.export.external_data import external_initializer, write_external_data
from flexi_export.export.fused import annotate_packs, build_fused_decoder, check_target
from flexi_export.export.manifest import TOLERANCES, build_manifest, load_manifest, write_manifest
from flexi_export.export.quant import QUANT_DTYPES, QuantConfig
from flexi_export.export.quant_reference import agreement, quantized_reference
from flexi_export.export.reference import REFERENCE_NAME, compute_reference, save_reference
from flexi_export.export.spec import ModelSpec, read_model
from flexi_export.files import atomic_output_dir, check_output_dir

FLOAT_DTYPES = ("fp32", "fp16")
SUPPORTED_DTYPES = (*FLOAT_DTYPES, *QUANT_DTYPES)
#: Opsets the graph is built for: 18 (default, portable) up to 22, the newest onnxruntime 1.21 loads.
SUPPORTED_OPSETS = tuple(range(18, 23))


@dataclass(frozen=True)
class ExportOptions:
    """How to export: dtype, opset, dense (no sharing), overwrite, self-check, progress bars; for int8/int4 how
    to quantize (block size, symmetric, MatMulNBits accuracy level, embedding / LM head too), and whether to
    have onnxruntime save its prepacked weights next to the bundle."""

    dtype: str = "fp32"
    opset: int = 18
    dense: bool = False
    overwrite: bool = False
    check: bool = True
    progress: bool = True
    block_size: int | None = None
    symmetric: bool = True
    accuracy_level: int | None = None
    quantize_embedding: bool = False
    prepack_external: bool = False
    #: ``portable`` (standard ops) or ``cpu`` (onnxruntime's fused contrib ops, :mod:`~flexi_export.export.fused`).
    target: str = "portable"

    @property
    def quant(self) -> QuantConfig | None:
        """The quantization of an int8/int4 bundle (None for fp32/fp16)."""
        if self.dtype not in QUANT_DTYPES:
            return None
        level = 4 if self.accuracy_level is None else self.accuracy_level
        return QuantConfig(self.dtype, self.block_size or 32, self.symmetric, level, self.quantize_embedding)

    @property
    def float_dtype(self) -> str:
        """The dtype of activations and of every weight that is not quantized."""
        return "fp32" if self.dtype in QUANT_DTYPES else self.dtype

    def validate(self) -> ExportOptions:
        """Raise :class:`ExportError` for an unsupported dtype, opset or quantization option."""
        if self.dtype not in SUPPORTED_DTYPES:
            raise ExportError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
        self._validate_quant()
        check_target(self.target, self.dtype)
        if not isinstance(self.opset, int) or isinstance(self.opset, bool) or self.opset not in SUPPORTED_OPSETS:
            raise ExportError(
                f"unsupported opset {self.opset!r}; supported: {SUPPORTED_OPSETS[0]}..{SUPPORTED_OPSETS[-1]} "
                f"(18 is the default; onnxruntime 1.21, the oldest supported runtime, loads up to 22)"
            )
        return self

    def _validate_quant(self) -> None:
        given = [
            flag
            for flag, value in (
                ("--block-size", self.block_size is not None),
                ("--asymmetric", not self.symmetric),
                ("--accuracy-level", self.accuracy_level is not None),
                ("--quantize-embedding", self.quantize_embedding),
            )
            if value
        ]
        if self.quant is None:
            if given:
                raise ExportError(f"{', '.join(given)} only apply to --dtype int8 or int4, not {self.dtype}")
            return
        if self.dtype == "int8" and (self.block_size is not None or self.accuracy_level is not None):
            raise ExportError(
                "--block-size and --accuracy-level apply to int4 (MatMulNBits); int8 weights have one scale per "
                "output channel (MatMulInteger)"
            )
        self.quant.validate()


def ir_version_for(opset: int) -> int:
    """The lowest ONNX IR version that carries ``opset`` (old runtimes refuse newer IR versions)."""
    for _release, ir_version, ai_onnx, *_ in helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return int(ir_version)
    raise ExportError(f"onnx {onnx.__version__} does not know opset {opset}")


def export_onnx(
    model: PreTrainedModel,
    out_dir: str | Path,
    *,
    tokenizer: Any | None = None,
    dtype: str = "fp32",
    opset: int = 18,
    dense: bool = False,
    overwrite: bool = False,
    check: bool = True,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    **quantization: Any,
) -> Bundle:
    """Export ``model`` (a float32 Flexi model, or a plain model as its identity plan) to the bundle ``out_dir``.

    ``dtype``: ``fp32``, ``fp16``, or ``int8`` / ``int4`` (quantized block matrices, see
    :class:`ExportOptions` for the ``quantization`` keywords: ``block_size``, ``symmetric``,
    ``accuracy_level``, ``quantize_embedding``, ``prepack_external``) and ``target`` (``portable``: standard ops;
    ``cpu``: onnxruntime's fused contrib ops, see :mod:`~flexi_export.export.fused`).
    ``dense=True`` gives every executed block its own copy of what it would share (same function, no sharing),
    for memory and speed comparisons.
    ``check`` runs ``onnx.checker`` and replays the reference prompts with onnxruntime before the folder is
    renamed into place. ``source`` describes where the model came from (name, sha256) for the manifest.
    Returns the written :class:`Bundle`.
    """
    options = _options(dtype, opset, dense, overwrite, check, progress, quantization)
    check_output_dir(out_dir, overwrite)
    _check_float32(model)
    with _eval_mode(model):
        spec = read_model(model, dense=dense)
        _check_quantizable(spec, options)
        blocks = _bar(range(len(spec.blocks)), options, "graph", unit="block")
        build = build_fused_decoder if options.target == "cpu" else build_decoder
        graph = build(spec, options.float_dtype, progress=blocks, quant=options.quant)
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            manifest = _write_bundle(tmp, model, tokenizer, spec, graph, options, source)
            if options.prepack_external:
                manifest = _prepack(tmp)
    return Bundle(path=Path(out_dir), manifest=manifest)


def _options(
    dtype: str, opset: int, dense: bool, overwrite: bool, check: bool, progress: bool, quantization: dict[str, Any]
) -> ExportOptions:
    known = {"block_size", "symmetric", "accuracy_level", "quantize_embedding", "prepack_external", "target"}
    unknown = sorted(set(quantization) - known)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
    return ExportOptions(dtype, opset, dense, overwrite, check, progress, **quantization).validate()


def _check_quantizable(spec: ModelSpec, options: ExportOptions) -> None:
    quant = options.quant
    if quant is not None and quant.dtype == "int8" and quant.quantize_embedding and spec.tied:
        raise ExportError(
            "--quantize-embedding with int8 needs an untied LM head: MatMulInteger reads [hidden, vocab] and the "
            "embedding lookup [vocab, hidden], so a tied table would be stored twice; use int4 (one packed copy "
            "serves both) or keep the embedding float"
        )


def _prepack(bundle_dir: Path) -> dict[str, Any]:
    """Have onnxruntime save its prepacked weights next to the bundle (see ``flexi-export prepack``)."""
    from flexi_export.export.prepack import prepack_bundle

    prepack_bundle(bundle_dir, check=False)
    return load_manifest(bundle_dir)


def export_folder(
    path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    opset: int = 18,
    dense: bool = False,
    overwrite: bool = False,
    check: bool = True,
    progress: bool = True,
    **quantization: Any,
) -> Bundle:
    """Export the model in ``path``: a Flexi checkpoint, or an HF folder (exported as its dense model).

    The options and the output folder are checked before anything is loaded. The manifest records the folder
    and a sha256 over its config and weight files. ``quantization``: as :func:`export_onnx`.
    """
    from flexi_export.source import load_source, model_fingerprint

    _options(dtype, opset, dense, overwrite, check, progress, quantization)
    check_output_dir(out_dir, overwrite)
    src = load_source(path, dtype=torch.float32)
    source = {"name": str(path), "sha256": model_fingerprint(path), "is_flexi": src.is_flexi}
    return export_onnx(
        src.model,
        out_dir,
        tokenizer=src.tokenizer,
        dtype=dtype,
        opset=opset,
        dense=dense,
        overwrite=overwrite,
        check=check,
        progress=progress,
        source=source,
        **quantization,
    )


def _write_bundle(
    tmp: Path,
    model: PreTrainedModel,
    tokenizer: Any | None,
    spec: ModelSpec,
    graph: DecoderGraph,
    options: ExportOptions,
    source: dict[str, Any] | None,
) -> dict[str, Any]:
    onnx_dir = tmp / files.ONNX_DIR
    onnx_dir.mkdir()
    data_path = onnx_dir / files.DATA_FILE
    total = sum(e.nbytes for e in graph.registry.entries)
    with _bar(None, options, "weights", total=total, unit="B", unit_scale=True) as bar:
        stored = write_external_data(data_path, graph.registry, on_bytes=bar.update)
    initializers = [external_initializer(t, files.DATA_FILE) for t in stored] + graph.inline
    ir_version = ir_version_for(options.opset)
    proto = _model_proto(graph, initializers, spec, options, ir_version)
    (onnx_dir / files.MODEL_FILE).write_bytes(proto.SerializeToString())
    del proto
    check_onnx(onnx_dir / files.MODEL_FILE)

    pad_id = files.pad_token_id(model, tokenizer)
    cases, quantization = _reference_cases(model, tokenizer, pad_id, spec, graph, options)
    tolerances = TOLERANCES[options.dtype]
    save_reference(tmp / REFERENCE_NAME, cases, tolerances)
    files.write_model_files(tmp, model, tokenizer, options.float_dtype)
    files.write_json(tmp / "genai_config.json", files.genai_config(model, spec.dims, graph.io, pad_id))
    spec.plan.save(tmp / "flexi_plan.json")
    manifest = build_manifest(
        stored=stored,
        data_file_bytes=data_path.stat().st_size,
        io=graph.io,
        dtype=options.dtype,
        opset=options.opset,
        ir_version=ir_version,
        dense=options.dense,
        plan_fingerprint=spec.plan.fingerprint(),
        source=_source_info(spec, source),
        inline=[{"name": t.name, "role": "rope.inv_freq", "shape": list(t.dims)} for t in graph.inline],
        quantization=quantization,
    )
    manifest["target"] = options.target
    annotate_packs(manifest, graph.registry, spec.names)
    issues = client_issues(model.config, graph.io, options.opset)
    manifest["clients"] = compatibility(issues)
    warn_client_issues(issues)
    write_manifest(tmp, manifest)  # first: the check's onnxruntime session uses the manifest's session options
    if options.check:
        manifest["export_check"] = check_reference(tmp, tolerances)
        write_manifest(tmp, manifest)
    return manifest


def _reference_cases(
    model: PreTrainedModel,
    tokenizer: Any | None,
    pad_id: int,
    spec: ModelSpec,
    graph: DecoderGraph,
    options: ExportOptions,
) -> tuple[list[Any], dict[str, Any] | None]:
    """The golden cases of ``reference.npz``: the model itself, or for a quantized bundle the model with the same
    quantization applied (what the graph computes), plus how far that moves it from the unquantized model."""
    if options.quant is None:
        return compute_reference(model, tokenizer, pad_id), None
    unquantized = compute_reference(model, tokenizer, pad_id)
    with quantized_reference(model, spec, graph.registry):
        cases = compute_reference(model, tokenizer, pad_id)
    return cases, {**options.quant.to_json(), "vs_unquantized": agreement(cases, unquantized)}


def _model_proto(
    graph: DecoderGraph, initializers: list[onnx.TensorProto], spec: ModelSpec, options: ExportOptions, ir: int
) -> onnx.ModelProto:
    onnx_graph = helper.make_graph(
        graph.nodes,
        "flexi_decoder",
        [t.value_info() for t in graph.io.inputs],
        [t.value_info() for t in graph.io.outputs],
        initializer=initializers,
    )
    proto = helper.make_model(
        onnx_graph,
        opset_imports=_opset_imports(options),
        producer_name="flexi-export",
        producer_version=__version__,
    )
    proto.ir_version = ir
    helper.set_model_props(
        proto,
        {
            "flexi.plan_fingerprint": spec.plan.fingerprint(),
            "flexi.dtype": options.dtype,
            "flexi.dense": str(options.dense).lower(),
            "flexi.target": options.target,
            "flexi.model_type": spec.dims.model_type,
        },
    )
    return proto


def _opset_imports(options: ExportOptions) -> list[onnx.OperatorSetIdProto]:
    """The default domain at ``opset``; int4 bundles also import com.microsoft (MatMulNBits), version 1."""
    imports = [helper.make_opsetid("", options.opset)]
    if options.dtype == "int4" or options.target == "cpu":
        imports.append(helper.make_opsetid("com.microsoft", 1))
    return imports


def _source_info(spec: ModelSpec, source: dict[str, Any] | None) -> dict[str, Any]:
    plan_source = spec.plan.source
    info = {"name": plan_source.name, "sha256": plan_source.sha256 or None, "model_type": spec.dims.model_type}
    info.update(source or {})
    return info


def _check_float32(model: PreTrainedModel) -> None:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    if dtypes != ["float32"]:
        raise ExportError(
            f"the exporter needs a float32 model (the reference outputs are computed in fp32), got "
            f"{', '.join(dtypes)}; load it with dtype=torch.float32 (the bundle dtype is chosen with dtype='fp16')"
        )
    devices = sorted({p.device.type for p in model.parameters()})
    if devices != ["cpu"]:
        raise ExportError(f"the exporter needs the model on the CPU, it is on {', '.join(devices)}; call model.cpu()")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode while exporting (the reference must not see dropout); the caller's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _bar(iterable: Any, options: ExportOptions, desc: str, **kwargs: Any) -> tqdm:
    return tqdm(iterable, desc=desc, disable=not options.progress, file=sys.stderr, leave=False, **kwargs)
