"""Block Influence (ShortGPT): how much each block changes the residual stream.

``BI_i = 1 - mean_t cos(h_in_t, h_out_t)`` over calibration tokens, where ``h_in`` / ``h_out`` are the raw
residual stream entering and leaving block ``i``. They are taken with hooks on the blocks themselves, not from
``output_hidden_states``: the last entry of that tuple is after the final norm, which would skew the last
block's score. Padding tokens (``attention_mask == 0``) are excluded. A low BI means the block barely changes
its input, so it is the first to be pruned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from flexi_export.errors import DataError
from flexi_export.layouts import layout_for
from flexi_export.model.build import get_module


class _InfluenceMeter:
    """Forward hooks that accumulate ``sum_t cos(h_in_t, h_out_t)`` and token counts per block (in fp64)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.sums = torch.zeros(len(layers), dtype=torch.float64)
        self.counts = torch.zeros(len(layers), dtype=torch.float64)
        self.mask: torch.Tensor | None = None
        self._handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)]

    def _hook(self, index: int):  # noqa: ANN202 (a hook closure)
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)  # [B, S]
            if self.mask is not None:
                keep = self.mask.to(cos.device).bool()
                self.sums[index] += cos[keep].double().sum().cpu()
                self.counts[index] += keep.sum().cpu().double()
            else:
                self.sums[index] += cos.double().sum().cpu()
                self.counts[index] += cos.numel()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def block_influence(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[float]:
    """Block Influence of every decoder block of ``model`` over the ``[N, S]`` token rows ``input_ids``.

    The model runs in eval mode on its own device; rows are fed ``batch_size`` at a time.
    """
    layout = layout_for(model.config.model_type)
    layers = get_module(model, layout.layers)
    device = next(model.parameters()).device
    meter = _InfluenceMeter(list(layers))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, input_ids.shape[0], batch_size), desc="block influence", disable=not progress, leave=False
        ):
            ids = input_ids[start : start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(device)
            meter.mask = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        meter.remove()
        model.train(was_training)
    if not bool((meter.counts > 0).all()):
        raise DataError("block influence needs at least one non-padding calibration token")
    return (1.0 - meter.sums / meter.counts).tolist()
