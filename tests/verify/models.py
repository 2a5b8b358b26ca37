"""The Flexi model the verify tests export: blocks 2 and 3 share block 1's matrices, which are 0.25-1 MiB in fp32,
so that a weight copied to the heap is far above measurement noise."""

from __future__ import annotations

from pathlib import Path

import torch

from flexi_export.checkpoint import save_flexi
from flexi_export.model import build_flexi
from flexi_export.plan import AdapterSpec, BlockPlan, SourceInfo, original, shared
from tests.helpers import randomize_own, tiny_model


def shared_flexi_checkpoint(folder: Path) -> torch.nn.Module:
    """Build the model (non-zero adapters and OFN), save its Flexi checkpoint to ``folder`` and return it."""
    torch.set_num_threads(1)
    source = tiny_model("llama", hidden_size=256, intermediate_size=1024, vocab_size=2048, num_hidden_layers=5)
    adapter = AdapterSpec(rank=8)
    plan = BlockPlan(
        SourceInfo("llama", 5),
        (original(0), original(1), shared(1, 2, adapter, ofn="rms"), shared(1, 3, adapter), original(4)),
    )
    flexi = randomize_own(build_flexi(source, plan))
    save_flexi(flexi, folder)
    return flexi
