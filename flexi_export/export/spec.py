"""What to export, read off a (Flexi or plain) transformers model and checked against its plan.

:func:`read_model` walks the executed blocks of the plan and returns a :class:`ModelSpec`: for every block its
norms, matrices, biases, adapters and OFN gammas as *references* to the model's own ``nn.Parameter`` objects.
A shared block's matrices are the owner block's Parameters (the same objects), which is what lets the weight
registry store each of them once. With ``dense=True`` every shared block gets :class:`Derived` tensors of its
own instead (its effective matrix ``W_j + scaling * B A``, copies of what it reads by reference), so the
same builder writes the same function without any sharing.

The walk doubles as the "plan fits the weights" check: every mismatch between the plan and the modules is
collected and raised as one :class:`~flexi_export.errors.PlanError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from flexi_export.errors import PlanError
from flexi_export.export.rope import RopeTables, rope_tables
from flexi_export.layouts import DecoderLayout, ModelDims, layout_for
from flexi_export.model.build import get_module, get_plan
from flexi_export.model.modules import SharedLinear, SharedNorm
from flexi_export.plan import BlockEntry, BlockPlan, ExecutedBlock

#: Transforms of tensors that stand for several member parameters (``--target cpu``; manifest rows carry ``parts``).
PACKED_TRANSFORMS = ("pack", "block_diag")


@dataclass(frozen=True)
class Derived:
    """A tensor the exporter computes instead of reading a Parameter (``--dense``, and ``--target cpu`` packs).

    ``compute`` returns it in torch's layout (``[out, in]`` for a matrix) and is called once, while the data
    file is written, so derived tensors never all sit in memory together.
    """

    name: str
    shape: tuple[int, ...]
    compute: Callable[[], torch.Tensor]
    #: Torch names of the Parameters it is computed from.
    sources: tuple[str, ...]
    #: ``copy`` (a private copy of ``sources[0]``), ``lora_merge`` (``W + scaling * B @ A``) or one of
    #: :data:`PACKED_TRANSFORMS`.
    transform: str
    scaling: float | None = None
    #: For a packed transform (``--target cpu``): the member tensors, concatenated along the output dimension
    #: (``pack``) or placed on a block diagonal (``block_diag``, a pack's adapter ``B`` matrices).
    parts: tuple[nn.Parameter | Derived, ...] = ()


#: A tensor to export: one of the model's Parameters, or one the exporter derives (dense mode).
TensorRef = nn.Parameter | Derived


@dataclass(frozen=True)
class OfnSpec:
    """Output feature normalisation of a branch output: variant (``layernorm`` / ``rms``), gamma and eps."""

    variant: str
    weight: TensorRef
    eps: float


@dataclass(frozen=True)
class LinearSpec:
    """One block matrix with its bias and, for a shared block, its adapter and OFN."""

    role: str
    path: str
    weight: TensorRef
    bias: TensorRef | None = None
    lora_a: TensorRef | None = None
    lora_b: TensorRef | None = None
    scaling: float = 1.0
    ofn: OfnSpec | None = None


@dataclass(frozen=True)
class BlockSpec:
    """One executed block: its plan entry, attention window, norms and matrices."""

    block: ExecutedBlock
    window: int | None
    attn_norm: TensorRef
    mlp_norm: TensorRef
    linears: dict[str, LinearSpec]

    @property
    def index(self) -> int:
        """Executed index (the ``i`` of ``past_key_values.{i}``)."""
        return self.block.index


@dataclass(frozen=True)
class ModelSpec:
    """Everything the graph builder needs, with no torch module left to inspect."""

    dims: ModelDims
    layout: DecoderLayout
    plan: BlockPlan
    embed: nn.Parameter
    final_norm: nn.Parameter
    lm_head: nn.Parameter
    blocks: tuple[BlockSpec, ...]
    rope: RopeTables
    dense: bool
    #: Parameter identity -> torch name of its owner (first name in ``named_parameters``).
    names: dict[int, str]

    @property
    def tied(self) -> bool:
        """True when the LM head *is* the embedding Parameter (stored once, read by Gather and Gemm)."""
        return self.lm_head is self.embed


def read_model(model: PreTrainedModel, dense: bool = False) -> ModelSpec:
    """Describe ``model`` (a Flexi model, or a plain model taken as the identity plan) for export."""
    layout = layout_for(model.config.model_type)
    dims = layout.dims(model.config)  # the executed config: one entry per executed block
    plan = get_plan(model) or BlockPlan.identity(model.config.model_type, model.config.num_hidden_layers)
    executed = plan.executed()
    layers = get_module(model, layout.layers)
    if not (len(executed) == len(layers) == dims.num_blocks):
        raise PlanError(
            f"the plan executes {len(executed)} blocks but the model has {len(layers)} "
            f"(config num_hidden_layers={dims.num_blocks})"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    problems: list[str] = []
    blocks = []
    for block in executed:
        where = f"executed block {block.index} ({block.entry.describe()})"
        walker = _BlockWalker(layers, block, layout, dims, names, dense, problems, where)
        blocks.append(walker.spec())
    if problems:
        raise PlanError(problems)
    lm_head = get_module(model, layout.lm_head).weight
    return ModelSpec(
        dims=dims,
        layout=layout,
        plan=plan,
        embed=get_module(model, layout.embed).weight,
        final_norm=get_module(model, layout.final_norm).weight,
        lm_head=lm_head,
        blocks=tuple(blocks),
        rope=rope_tables(model.config),
        dense=dense,
        names=names,
    )


class _BlockWalker:
    """Reads one executed block's modules, checks them against its plan entry, and builds its :class:`BlockSpec`."""

    def __init__(
        self,
        layers: nn.ModuleList,
        block: ExecutedBlock,
        layout: DecoderLayout,
        dims: ModelDims,
        names: dict[int, str],
        dense: bool,
        problems: list[str],
        where: str,
    ) -> None:
        self.layer = layers[block.index]
        self.owner = layers[block.owner]
        self.block = block
        self.layout = layout
        self.dims = dims
        self.names = names
        self.dense = dense and block.entry.kind == "shared"
        self.problems = problems
        self.where = where
        self.prefix = f"{layout.layers}.{block.index}."

    def spec(self) -> BlockSpec:
        norms = {role: self._norm(path) for role, path in self.layout.norms.items()}
        linears = {role: self._linear(role, path) for role, path in self.layout.linears.items()}
        return BlockSpec(
            block=self.block,
            window=self.dims.sliding_windows[self.block.index],
            attn_norm=norms["attn_norm"],
            mlp_norm=norms["mlp_norm"],
            linears=linears,
        )

    # ------------------------------------------------------------------------------------------------ norms
    def _norm(self, path: str) -> TensorRef:
        module = get_module(self.layer, path)
        entry = self.block.entry
        wants_source = entry.kind == "shared" and entry.norms == "source"
        if isinstance(module, SharedNorm):
            if not wants_source:
                self.problems.append(f"{self.where}: {path} reads another block's norm, the plan gives it its own")
            elif module.base is not get_module(self.owner, path):
                self.problems.append(f"{self.where}: {path} does not read block {self.block.owner}'s norm")
            weight = module.base.weight
            return self._copy(path + ".weight", weight) if self.dense else weight
        if wants_source:
            self.problems.append(f"{self.where}: {path} has its own weights, the plan says norms='source'")
        return module.weight

    # ---------------------------------------------------------------------------------------------- linears
    def _linear(self, role: str, path: str) -> LinearSpec:
        module = get_module(self.layer, path)
        if self.block.entry.kind == "original":
            if isinstance(module, SharedLinear):
                self.problems.append(f"{self.where}: {path} shares another block's weights, the plan says original")
            return LinearSpec(role, path, module.weight, module.bias)
        if not isinstance(module, SharedLinear):
            self.problems.append(
                f"{self.where}: {path} has its own weights, the plan says it shares block {self.block.entry.source}'s"
            )
            return LinearSpec(role, path, module.weight, module.bias)
        self._check_shared(role, path, module)
        ofn = None
        if module.ofn is not None:
            ofn = OfnSpec(module.ofn.variant, module.ofn.weight, module.ofn.eps)
        if self.dense:
            bias = None if module.bias is None else self._copy(path + ".bias", module.bias)
            return LinearSpec(role, path, self._merged(path, module), bias, ofn=ofn)
        lora_a = None if module.lora_A is None else module.lora_A.weight
        lora_b = None if module.lora_B is None else module.lora_B.weight
        return LinearSpec(role, path, module.weight, module.bias, lora_a, lora_b, module.scaling, ofn)

    def _check_shared(self, role: str, path: str, module: SharedLinear) -> None:
        entry: BlockEntry = self.block.entry
        if module.base is not get_module(self.owner, path):
            self.problems.append(f"{self.where}: {path} does not read block {entry.source}'s weights")
        adapter = entry.adapter
        want_rank = adapter.rank if adapter is not None and role in adapter.targets else None
        rank = None if module.lora_A is None else module.lora_A.weight.shape[0]
        if rank != want_rank:
            self.problems.append(f"{self.where}: {path} has adapter rank {rank}, the plan says {want_rank}")
        elif adapter is not None and rank is not None and abs(module.scaling - adapter.scaling) > 1e-12:
            self.problems.append(
                f"{self.where}: {path} has adapter scaling {module.scaling}, the plan says {adapter.scaling}"
            )
        want_ofn = entry.ofn if role in self.layout.branch_outputs and entry.ofn != "none" else None
        ofn = None if module.ofn is None else module.ofn.variant
        if ofn != want_ofn:
            self.problems.append(f"{self.where}: {path} has OFN {ofn}, the plan says {want_ofn}")

    # ----------------------------------------------------------------------------------------- dense tensors
    def _copy(self, rest: str, source: nn.Parameter) -> Derived:
        """A private copy of ``source`` named after this block (dense export of a shared block)."""
        return Derived(
            name=self.prefix + rest,
            shape=tuple(source.shape),
            compute=lambda: source.detach(),
            sources=(self.names[id(source)],),
            transform="copy",
        )

    def _merged(self, path: str, module: SharedLinear) -> Derived:
        """This block's effective matrix ``W_owner + scaling * B @ A`` (a plain copy without an adapter)."""
        weight = module.weight
        if module.lora_A is None or module.lora_B is None:
            return self._copy(path + ".weight", weight)
        a, b, scaling = module.lora_A.weight, module.lora_B.weight, module.scaling

        def compute() -> torch.Tensor:
            with torch.no_grad():
                return (weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype)

        return Derived(
            name=self.prefix + path + ".weight",
            shape=tuple(weight.shape),
            compute=compute,
            sources=(self.names[id(weight)], self.names[id(a)], self.names[id(b)]),
            transform="lora_merge",
            scaling=scaling,
        )
