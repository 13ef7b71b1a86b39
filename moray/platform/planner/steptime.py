"""A first-order model of one training step's time, to rank layouts.

Per microbatch, the slowest stage spends:
- compute: 3 x its forward FLOPs (4 x with activation checkpointing) at the
  accelerator's matmul efficiency; attention scores counted as in flops.py,
  the output head on the last stage at its vocabulary share (1/tp: the
  trainer's head is vocabulary-parallel), the embedding lookup as free;
- tensor parallel: 4 all-reduces of the (tokens x d_model) activations per
  block (2 forward, 2 backward; +2 when recomputing), ring cost 2(t-1)/t, on
  NVLink;
- expert parallel: 4 all-to-alls per MoE block of the routed copies (top_k per
  token; under sequence parallelism each tensor rank sends only its 1/tp, else
  every tensor rank sends them all), (e-1)/e of them leave the rank, on NVLink
  when the expert group fits in a node, else the network;
- pipeline: one activation forward and one gradient backward, not overlapped
  (a sequence shard, 1/tp, under sequence parallelism).
The pipeline runs m + (p-1)/v such slots (the bubble is the p-1). Gradient
reduction over dp (experts over dp / ep) overlaps the last microbatch's
backward; what is left shows. The optimizer step streams the rank's weights,
gradients and sharded optimizer state through HBM once.

Not modelled: kernel launch overheads, stragglers, load imbalance between
experts, failures (see the goodput section). Treat the modelled MFU as an
upper bound, and the assumed MFU (--mfu) as the plan's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moray.model.params import attention_params_per_layer, expert_params
from moray.platform.planner.flops import flops_per_token
from moray.platform.planner.memory import pipeline_ranks, precision, rank_params
from moray.platform.planner.workload import Workload


@dataclass(frozen=True)
class StepEstimate:
    microbatches: int
    tokens_per_step: int
    compute_s: float  # forward + backward (+ recompute) of all microbatches on the slowest stage
    tp_comm_s: float
    ep_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_exposed_s: float
    optimizer_s: float
    step_s: float
    modeled_mfu: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


def ring_factor(n: int) -> float:
    """Bytes a rank sends in a ring all-reduce, per byte of the buffer."""
    return 2 * (n - 1) / n if n > 1 else 0.0


def layer_forward_flops_per_token(w: Workload, tp: int) -> float:
    cfg = w.model
    matmul = attention_params_per_layer(cfg) + cfg.active_experts * expert_params(cfg)
    if cfg.is_moe:
        matmul += cfg.d_model * cfg.n_experts
    return (2 * matmul + 4 * cfg.n_heads * cfg.head_dim * w.seq_len) / tp


def estimate_step(w: Workload, tp: int, pp: int, ep: int, dp: int, micro_batch_size: int,
                  activation_checkpointing: bool, sequence_parallel: bool = False) -> StepEstimate:
    cfg, acc = w.model, w.accelerator
    prec = precision(w.dtype)
    g = w.gpus_per_node
    n_gpus = tp * pp * dp
    m = w.microbatches_for(pp, dp, micro_batch_size)
    tokens = micro_batch_size * w.seq_len  # per microbatch
    v = w.virtual_stages if w.schedule == "interleaved_1f1b" and pp > 1 else 1
    sp = sequence_parallel and tp > 1
    ranks = pipeline_ranks(cfg, pp, virtual_stages=v, tp=tp, sequence_parallel=sp)
    recompute = 4 / 3 if activation_checkpointing else 1.0
    flops_rate = acc.peak_flops * acc.matmul_efficiency

    layer_flops = layer_forward_flops_per_token(w, tp)
    head_flops = 2 * -(-cfg.vocab_size // tp) * cfg.d_model  # vocabulary-parallel: the fullest rank's rows
    stage_fwd = [r.layers * layer_flops + (head_flops if r.last else 0) for r in ranks]
    slowest = max(range(pp), key=lambda s: stage_fwd[s])
    layers = ranks[slowest].layers
    compute_mb = 3 * stage_fwd[slowest] * tokens * recompute / flops_rate

    act_bytes = tokens * cfg.d_model * prec.activation
    passes = 6 if activation_checkpointing else 4  # forward, backward (and recomputed forward) collectives
    tp_mb = passes * layers * ring_factor(tp) * act_bytes / acc.intra_node_bandwidth
    ep_mb = 0.0
    if cfg.is_moe and ep > 1:
        bw = acc.intra_node_bandwidth if tp * ep <= g else acc.inter_node_bandwidth
        a2a = act_bytes * cfg.top_k / (tp if sp else 1) * (ep - 1) / ep
        ep_mb = passes * layers * a2a / bw
    pp_mb = 0.0
    if pp > 1:
        bw = acc.intra_node_bandwidth if n_gpus <= g else acc.inter_node_bandwidth
        pp_mb = 2 * act_bytes / (tp if sp else 1) / bw
    slot = compute_mb + tp_mb + ep_mb + pp_mb
    bubble = (pp - 1) / v * slot

    params = max((rank_params(cfg, tp, ep, r, pp, vocab_parallel=tp > 1) for r in (ranks[0], ranks[-1])),
                 key=lambda p: p.total)
    dp_bw = acc.intra_node_bandwidth if tp * dp <= g else acc.inter_node_bandwidth
    dp_comm = (params.dense * ring_factor(dp) + params.expert * ring_factor(max(1, dp // ep))) * prec.grad / dp_bw
    dp_exposed = max(0.0, dp_comm - compute_mb * 2 / 3)
    sharded = params.dense / dp + params.expert / max(1, dp // ep) if w.zero else params.total
    opt_bytes = params.total * (prec.weight + prec.grad) + 2 * sharded * (prec.master + prec.adam)
    optimizer = opt_bytes / acc.memory_bandwidth

    step = m * slot + bubble + dp_exposed + optimizer
    tokens_per_step = m * dp * tokens
    useful = 3 * flops_per_token(cfg, w.seq_len) * tokens_per_step
    return StepEstimate(
        microbatches=m, tokens_per_step=tokens_per_step,
        compute_s=m * compute_mb, tp_comm_s=m * tp_mb, ep_comm_s=m * ep_mb, pp_comm_s=m * pp_mb,
        bubble_s=bubble, dp_comm_exposed_s=dp_exposed, optimizer_s=optimizer, step_s=step,
        modeled_mfu=useful / (n_gpus * acc.peak_flops * step),
    )
