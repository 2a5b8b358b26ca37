"""The block plan: the one decision object of flexi-export.

A :class:`BlockPlan` says, for every block of the source model, what the Flexi model does with it, in the
order the blocks execute. It is pure data (no torch), round-trips through canonical JSON, validates itself and
has a :meth:`BlockPlan.fingerprint` that travels with every artifact built from it.

Entries:

- ``original(source=j)``: block ``j`` runs with its own weights;
- ``shared(source=j, replaces=i | None, adapter=..., norms=..., ofn=...)``: runs block ``j``'s big matrices
  plus its *own* low-rank adapters, norms and output-feature-normalisation (OFN) parameters. ``replaces=i``
  stands in for pruned block ``i``; ``replaces=None`` is an inserted block (model extension);
- ``removed(source=i)``: block ``i`` is skipped (ShortGPT baseline). It does not execute.

Every source block is accounted for exactly once: as ``original(i)``, ``removed(i)`` or a shared entry with
``replaces=i``. Inserted blocks are extra.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from flexi_export.errors import InputError, PlanError

PLAN_FORMAT = "flexi-plan/1"

#: The block matrices an adapter can target (names shared by the Llama, Mistral and Qwen2 families).
LINEAR_ROLES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

EntryKind = Literal["original", "shared", "removed"]
NormsMode = Literal["own", "source"]
#: Output feature normalisation variants: ``none`` (off), ``layernorm`` ((h - mean) / std * gamma per token),
#: ``rms`` (h / rms * gamma per token).
OFN_VARIANTS: tuple[str, ...] = ("none", "layernorm", "rms")
NORMS_MODES: tuple[str, ...] = ("own", "source")


@dataclass(frozen=True)
class AdapterSpec:
    """Low-rank adapter of a shared block: ``y = W_j x + (alpha / rank) * B A x`` on each target matrix."""

    rank: int
    alpha: float | None = None
    targets: tuple[str, ...] = LINEAR_ROLES

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to ``B A x`` (1.0 when ``alpha`` is not set)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def problems(self) -> list[str]:
        """Everything wrong with this spec, as readable sentences (empty when valid)."""
        out: list[str] = []
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            out.append(f"adapter rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not float(self.alpha) > 0:
            out.append(f"adapter alpha must be > 0, got {self.alpha!r}")
        if not self.targets:
            out.append("adapter targets are empty")
        unknown = [t for t in self.targets if t not in LINEAR_ROLES]
        if unknown:
            out.append(f"unknown adapter targets {unknown}; known: {', '.join(LINEAR_ROLES)}")
        if len(set(self.targets)) != len(self.targets):
            out.append("adapter targets contain duplicates")
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdapterSpec:
        """Inverse of :meth:`to_json`."""
        return cls(
            rank=data["rank"],
            alpha=data.get("alpha"),
            targets=tuple(data.get("targets", LINEAR_ROLES)),
        )


@dataclass(frozen=True)
class BlockEntry:
    """One block of the plan. Build entries with :func:`original`, :func:`shared` and :func:`removed`."""

    kind: EntryKind
    source: int
    replaces: int | None = None
    adapter: AdapterSpec | None = None
    norms: NormsMode = "own"
    ofn: str = "none"

    @property
    def executes(self) -> bool:
        """True unless the block is removed."""
        return self.kind != "removed"

    @property
    def inserted(self) -> bool:
        """True for a shared block that replaces nothing (model extension)."""
        return self.kind == "shared" and self.replaces is None

    def describe(self) -> str:
        """Short human description, e.g. ``shared(source=2, replaces=5, rank=8)``."""
        if self.kind != "shared":
            return f"{self.kind}(source={self.source})"
        parts = [f"source={self.source}", f"replaces={self.replaces}"]
        if self.adapter is not None:
            parts.append(f"rank={self.adapter.rank}")
        if self.ofn != "none":
            parts.append(f"ofn={self.ofn}")
        if self.norms != "own":
            parts.append(f"norms={self.norms}")
        return f"shared({', '.join(parts)})"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (only the fields meaningful for this kind)."""
        out: dict[str, Any] = {"kind": self.kind, "source": self.source}
        if self.kind == "shared":
            out["replaces"] = self.replaces
            out["adapter"] = None if self.adapter is None else self.adapter.to_json()
            out["norms"] = self.norms
            out["ofn"] = self.ofn
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BlockEntry:
        """Inverse of :meth:`to_json`."""
        adapter = data.get("adapter")
        return cls(
            kind=data["kind"],
            source=data["source"],
            replaces=data.get("replaces"),
            adapter=None if adapter is None else AdapterSpec.from_json(adapter),
            norms=data.get("norms", "own"),
            ofn=data.get("ofn", "none"),
        )


def original(source: int) -> BlockEntry:
    """Block ``source`` runs with its own weights."""
    return BlockEntry(kind="original", source=source)


def removed(source: int) -> BlockEntry:
    """Block ``source`` is skipped."""
    return BlockEntry(kind="removed", source=source)


def shared(
    source: int,
    replaces: int | None,
    adapter: AdapterSpec | None = None,
    norms: NormsMode = "own",
    ofn: str = "none",
) -> BlockEntry:
    """A block that runs block ``source``'s matrices (by reference) plus its own adapters, norms and OFN."""
    return BlockEntry(kind="shared", source=source, replaces=replaces, adapter=adapter, norms=norms, ofn=ofn)


@dataclass(frozen=True)
class SourceInfo:
    """What the plan was made for: the source model's family, block count and identity."""

    model_type: str
    num_blocks: int
    name: str = ""
    sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"model_type": self.model_type, "num_blocks": self.num_blocks, "name": self.name, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SourceInfo:
        """Inverse of :meth:`to_json`."""
        return cls(
            model_type=data["model_type"],
            num_blocks=data["num_blocks"],
            name=data.get("name", ""),
            sha256=data.get("sha256", ""),
        )


@dataclass(frozen=True)
class ExecutedBlock:
    """A block as it executes: its position ``index`` among executed blocks and its plan entry."""

    index: int
    entry: BlockEntry
    #: For shared blocks, the executed index of the original block whose matrices it runs; else ``index``.
    owner: int


@dataclass(frozen=True)
class BlockPlan:
    """Ordered blocks of a Flexi model plus provenance. See the module docstring for the entry kinds."""

    source: SourceInfo
    entries: tuple[BlockEntry, ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def identity(cls, model_type: str, num_blocks: int, name: str = "", sha256: str = "") -> BlockPlan:
        """The plan that keeps every block as it is (a dense model)."""
        return cls(
            source=SourceInfo(model_type, num_blocks, name, sha256),
            entries=tuple(original(i) for i in range(num_blocks)),
        )

    def with_provenance(self, **items: Any) -> BlockPlan:
        """A copy with ``items`` merged into the provenance."""
        return replace(self, provenance={**self.provenance, **items})

    # ------------------------------------------------------------------------------------------------ views
    def executed(self) -> list[ExecutedBlock]:
        """The executed blocks in order, with each shared block's owner (executed index of its source).

        Raises :class:`PlanError` if the plan is invalid.
        """
        self.validate()
        position = {}
        index = 0
        for entry in self.entries:
            if entry.executes:
                if entry.kind == "original":
                    position[entry.source] = index
                index += 1
        out = []
        index = 0
        for entry in self.entries:
            if not entry.executes:
                continue
            owner = position[entry.source] if entry.kind == "shared" else index
            out.append(ExecutedBlock(index=index, entry=entry, owner=owner))
            index += 1
        return out

    @property
    def num_executed(self) -> int:
        """Number of blocks that execute (``num_hidden_layers`` of the Flexi model)."""
        return sum(1 for e in self.entries if e.executes)

    def count(self, kind: EntryKind) -> int:
        """Number of entries of ``kind``."""
        return sum(1 for e in self.entries if e.kind == kind)

    def __iter__(self) -> Iterator[BlockEntry]:
        return iter(self.entries)

    # ------------------------------------------------------------------------------------------- validation
    def problems(self) -> list[str]:
        """Every problem of the plan as a sentence that names the offending entry (empty when valid)."""
        out: list[str] = []
        n = self.source.num_blocks
        if not isinstance(n, int) or n <= 0:
            return [f"source.num_blocks must be a positive integer, got {n!r}"]
        if not self.entries:
            return ["the plan has no entries"]
        kept = {e.source for e in self.entries if e.kind == "original"}
        accounted: dict[int, list[int]] = {}
        for pos, e in enumerate(self.entries):
            where = f"entry {pos} ({e.describe()})"
            if e.kind not in ("original", "shared", "removed"):
                out.append(f"entry {pos}: unknown kind {e.kind!r}")
                continue
            if not _is_index(e.source, n):
                out.append(f"{where}: source block {e.source!r} does not exist (the source has blocks 0..{n - 1})")
                continue
            if e.kind != "shared":
                accounted.setdefault(e.source, []).append(pos)
                continue
            out.extend(_shared_problems(where, e, n, kept, self.entries))
            if e.replaces is not None and _is_index(e.replaces, n):
                accounted.setdefault(e.replaces, []).append(pos)
        for block in range(n):
            positions = accounted.get(block, [])
            if not positions:
                out.append(
                    f"source block {block} is not accounted for: add original({block}), removed({block}) "
                    f"or a shared entry with replaces={block}"
                )
            elif len(positions) > 1:
                out.append(f"source block {block} is accounted for {len(positions)} times (entries {positions})")
        if not any(e.executes for e in self.entries):
            out.append("no block executes: keep at least one block")
        return out

    def validate(self) -> BlockPlan:
        """Raise :class:`PlanError` listing every problem; return ``self`` when the plan is valid."""
        problems = self.problems()
        if problems:
            raise PlanError(problems)
        return self

    # ------------------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict with ``"format": "flexi-plan/1"``."""
        return {
            "format": PLAN_FORMAT,
            "source": self.source.to_json(),
            "entries": [e.to_json() for e in self.entries],
            "provenance": _jsonable(self.provenance),
        }

    def canonical_json(self) -> str:
        """Canonical JSON text: sorted keys, no insignificant whitespace, UTF-8."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    def fingerprint(self) -> str:
        """sha256 (hex) of :meth:`canonical_json`; equal plans have equal fingerprints."""
        return hashlib.sha256(self.canonical_json().encode("utf-8")).hexdigest()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BlockPlan:
        """Parse a plan dict; raises :class:`PlanError` on a wrong format or malformed fields."""
        if not isinstance(data, Mapping):
            raise PlanError("the plan must be a JSON object")
        fmt = data.get("format")
        if fmt != PLAN_FORMAT:
            raise PlanError(f"unsupported plan format {fmt!r} (expected {PLAN_FORMAT!r})")
        try:
            return cls(
                source=SourceInfo.from_json(data["source"]),
                entries=tuple(BlockEntry.from_json(e) for e in data["entries"]),
                provenance=dict(data.get("provenance") or {}),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise PlanError(f"malformed plan JSON ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | Path) -> Path:
        """Write the plan as indented JSON (validated first)."""
        self.validate()
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BlockPlan:
        """Read and validate a plan file (or the ``flexi_plan.json`` inside a folder)."""
        path = Path(path)
        if path.is_dir():
            path = path / "flexi_plan.json"
        if not path.is_file():
            raise InputError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"{path} is not valid JSON ({exc})") from None
        return cls.from_json(data).validate()


def _is_index(value: object, n: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n


def _shared_problems(where: str, e: BlockEntry, n: int, kept: set[int], entries: Sequence[BlockEntry]) -> list[str]:
    out: list[str] = []
    if e.replaces is not None and not _is_index(e.replaces, n):
        out.append(f"{where}: replaces block {e.replaces!r}, which does not exist (blocks 0..{n - 1})")
    if e.source not in kept:
        fate = next((x for x in entries if x.kind != "shared" and x.source == e.source), None)
        replaced = any(x.kind == "shared" and x.replaces == e.source for x in entries)
        if fate is not None and fate.kind == "removed":
            reason = "which is removed"
        elif replaced:
            reason = "which is itself replaced by a shared block (no chains: share from kept blocks only)"
        else:
            reason = "which is not kept as original"
        out.append(f"{where}: sources block {e.source}, {reason}")
    if e.replaces is not None and e.replaces == e.source:
        out.append(f"{where}: a block cannot replace itself")
    if e.adapter is not None:
        out.extend(f"{where}: {p}" for p in e.adapter.problems())
    if e.norms not in NORMS_MODES:
        out.append(f"{where}: norms must be one of {NORMS_MODES}, got {e.norms!r}")
    if e.ofn not in OFN_VARIANTS:
        out.append(f"{where}: ofn must be one of {OFN_VARIANTS}, got {e.ofn!r}")
    return out


def _jsonable(value: Any) -> Any:
    """Provenance values as plain JSON types (tuples to lists, numpy scalars to Python numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # canonical JSON has no NaN / Infinity
    return value
