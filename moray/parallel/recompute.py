"""Activation recomputation, applied from outside the model: whole blocks or attention only.

    parallel.activation_checkpointing: true   turn it on
    parallel.recompute: block | attention     what a checkpointed block recomputes
    parallel.recompute_every: k               which blocks: global index a multiple of k

"block" (full checkpointing) keeps only each checkpointed block's input and runs
the whole block again in backward. "attention" (selective, as Megatron-LM's
selective recomputation keeps the cheap-to-store and recomputes the
cheap-to-compute) keeps the attention's input and drops what it saved (q, k, v,
its output and the softmax statistics), while the MoE keeps its activations:
recomputing the MoE would repeat both expert all-to-alls and the routing, and
its saved rows are what the experts need in backward anyway. "every k"
(torchtitan's ac_freq) checkpoints 1 block in k and keeps the others whole: a
dial between memory and the recompute's extra forward.

Blocks are picked by their global index (i % k == 0), so a stage's share does
not depend on the layout and the planner counts the same blocks
(planner/activations.py). The forward of the module is wrapped, not the
module, so parameter names do not change; under tensor parallelism the
attention's region hooks (gather / reduce-scatter) sit outside the wrapped
forward, so recomputing attention repeats no collective.
"""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("block", "attention")


def checkpointed_blocks(layer_ids, every: int):
    """The global block indices among `layer_ids` that recomputation covers."""
    return [i for i in layer_ids if i % every == 0]


def _wrap_forward(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args, _inner=inner, **kwargs):
        return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_recompute(model: nn.Module, mode: str = "block", every: int = 1) -> None:
    """Recompute in backward `mode` ("block" or "attention") of every block of `model` (a
    Transformer or a pipeline stage) whose global index is a multiple of `every`."""
    if mode not in MODES:
        raise ValueError(f"parallel.recompute {mode!r}: use one of {', '.join(MODES)}")
    if every < 1:
        raise ValueError(f"parallel.recompute_every {every}: use 1 (every block) or more")
    for name in checkpointed_blocks([int(n) for n in model.layers.keys()], every):
        block = model.layers[str(name)]
        _wrap_forward(block if mode == "block" else block.attention)
