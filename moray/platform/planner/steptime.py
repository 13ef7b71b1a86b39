"""A first-order model of one training step's time, to rank layouts.

Per microbatch, the slowest stage spends:
- compute: 3 x its forward FLOPs, plus the recomputed forward of checkpointed
  blocks (parallel.recompute: the whole block, or attention only; every k-th
  block), at the accelerator's matmul efficiency; attention scores counted as
  in flops.py, the output head on the last stage at its vocabulary share (1/tp:
  the trainer's head is vocabulary-parallel), the embedding lookup as free;
- tensor parallel, per block and pass (forward, backward, a recomputed
  forward): the attention region's all-reduce (or all-gather + reduce-scatter
  under sequence parallelism: the same bytes) of the (tokens x d_model)
  activations, and the FFN region's: a dense MLP's the same; the experts' over
  their expert-tensor group (etp), of the routed rows (top_k per token; under
  sequence parallelism the group's rows, etp / tp of them), nothing at etp 1;
  ring cost 2(t-1)/t, on NVLink;
- expert parallel: 4 all-to-alls per MoE block (+2 when the block is
  recomputed whole) of the routed copies (top_k per token; under sequence
  parallelism each tensor rank sends only its 1/tp, else every tensor rank
  sends them all), (e-1)/e of them leave the rank, on NVLink when the expert
  group fits in a node (it spans ep x etp consecutive ranks: at etp 1, ep of
  them), else the network;
- pipeline: one activation forward and one gradient backward, not overlapped
  (a sequence shard, 1/tp, under sequence parallelism).
The pipeline runs m + (p-1)/v such slots (the bubble is the p-1).

Gradient reduction (moray/parallel/grad_reduce.py) runs in buckets during the
last microbatch's backward: dense parameters over dp, partial-gradient ones
over dp x tp, experts over edp; an all-reduce (2(n-1)/n of the gradients)
without ZeRO, a reduce-scatter ((n-1)/n) with it. What the last microbatch's
backward cannot hide shows, and at least the last bucket's reduction always
does (parallel.overlap_grad_reduce false: all of it). ZeRO-1 then all-gathers
the updated parameters ((n-1)/n of the weights), after the optimizer step, in
full view. The optimizer step streams the rank's weights, gradients and
sharded optimizer state through HBM once.

Not modelled: kernel launch overheads, stragglers, load imbalance between
experts, failures (see the goodput section). Treat the modelled MFU as an
upper bound, and the assumed MFU (--mfu) as the plan's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moray.model.params import attention_params_per_layer, expert_params
from moray.platform.planner.flops import flops_per_token
from moray.platform.planner.memory import pipeline_ranks, precision, rank_params, stage_layer_counts
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
    dp_comm_exposed_s: float  # the reduction the backward did not hide, and ZeRO's parameter all-gather
    optimizer_s: float
    step_s: float
    modeled_mfu: float
    dp_comm_s: float = 0.0  # the whole gradient reduction, hidden or not
    param_gather_s: float = 0.0  # ZeRO-1's all-gather of the updated parameters

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


def attention_forward_flops_per_token(w: Workload, tp: int) -> float:
    cfg = w.model
    return (2 * attention_params_per_layer(cfg) + 4 * cfg.n_heads * cfg.head_dim * w.seq_len) / tp


def checkpointed_layers(w: Workload, pp: int, v: int, tp: int, sp: bool, pp_rank: int,
                        activation_checkpointing: bool) -> int:
    """Blocks of pipeline rank `pp_rank` that recomputation covers (recompute.py picks global
    indices that are multiples of recompute_every)."""
    if not activation_checkpointing:
        return 0
    counts = stage_layer_counts(w.model, pp * v, None, tp, sp)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    ids = [i for st in range(pp_rank, pp * v, pp) for i in range(starts[st], starts[st] + counts[st])]
    return sum(1 for i in ids if i % w.recompute_every == 0)


def dp_reduction_seconds(w: Workload, params, tp: int, dp: int, ep: int, etp: int, bw: float,
                         backward_s: float) -> tuple:
    """(whole reduction, exposed reduction, parameter all-gather) in seconds (module doc)."""
    prec = precision(w.dtype)
    edp = max(1, dp * tp // (ep * etp))
    groups = ((params.dense - params.partial, dp), (params.partial, dp * tp), (params.expert, edp))
    per_byte = (lambda n: (n - 1) / n) if w.zero else ring_factor
    reduce_bytes = sum(count * per_byte(n) for count, n in groups) * prec.grad
    gather_bytes = sum(count * (n - 1) / n for count, n in groups) * prec.weight if w.zero else 0.0
    whole = reduce_bytes / bw
    total_grads = sum(count for count, n in groups if n > 1) * prec.grad
    last_bucket = whole * min(1.0, w.grad_bucket_bytes / total_grads) if total_grads else 0.0
    exposed = max(last_bucket, whole - backward_s) if w.overlap_grad_reduce else whole
    return whole, exposed, gather_bytes / bw


def estimate_step(w: Workload, tp: int, pp: int, ep: int, dp: int, micro_batch_size: int,
                  activation_checkpointing: bool, sequence_parallel: bool = False,
                  etp: int | None = None) -> StepEstimate:
    cfg, acc = w.model, w.accelerator
    prec = precision(w.dtype)
    g = w.gpus_per_node
    etp = tp if etp is None else etp
    n_gpus = tp * pp * dp
    m = w.microbatches_for(pp, dp, micro_batch_size)
    tokens = micro_batch_size * w.seq_len  # per microbatch
    v = w.virtual_stages if w.schedule == "interleaved_1f1b" and pp > 1 else 1
    sp = sequence_parallel and tp > 1
    ranks = pipeline_ranks(cfg, pp, virtual_stages=v, tp=tp, sequence_parallel=sp)
    flops_rate = acc.peak_flops * acc.matmul_efficiency

    layer_flops = layer_forward_flops_per_token(w, tp)
    head_flops = 2 * -(-cfg.vocab_size // tp) * cfg.d_model  # vocabulary-parallel: the fullest rank's rows
    stage_fwd = [r.layers * layer_flops + (head_flops if r.last else 0) for r in ranks]
    slowest = max(range(pp), key=lambda s: stage_fwd[s])
    layers = ranks[slowest].layers
    ckpt = checkpointed_layers(w, pp, v, tp, sp, slowest, activation_checkpointing)
    whole_block = w.recompute != "attention"
    again = ckpt * (layer_flops if whole_block else attention_forward_flops_per_token(w, tp))
    compute_mb = (3 * stage_fwd[slowest] + again) * tokens / flops_rate

    act_bytes = tokens * cfg.d_model * prec.activation
    attention_region = ring_factor(tp) * act_bytes
    if cfg.is_moe:  # the experts' rows over their expert-tensor group (expert_parallel.py)
        ffn_region = ring_factor(etp) * cfg.top_k * act_bytes * (etp / tp if sp else 1)
    else:
        ffn_region = ring_factor(tp) * act_bytes
    # forward and backward of every block; a recomputed block's forward repeats its regions' collectives
    # (recomputing attention only does not: its region hooks sit outside the recomputed forward)
    tp_passes = 2 * layers + (ckpt if whole_block else 0)
    tp_mb = tp_passes * (attention_region + ffn_region) / acc.intra_node_bandwidth if tp > 1 else 0.0
    ep_mb = 0.0
    if cfg.is_moe and ep > 1:
        bw = acc.intra_node_bandwidth if ep * etp <= g else acc.inter_node_bandwidth
        a2a = act_bytes * cfg.top_k / (tp if sp else 1) * (ep - 1) / ep
        ep_mb = (4 * layers + (2 * ckpt if whole_block else 0)) * a2a / bw
    pp_mb = 0.0
    if pp > 1:
        bw = acc.intra_node_bandwidth if n_gpus <= g else acc.inter_node_bandwidth
        pp_mb = 2 * act_bytes / (tp if sp else 1) / bw
    slot = compute_mb + tp_mb + ep_mb + pp_mb
    bubble = (pp - 1) / v * slot

    params = max((rank_params(cfg, tp, ep, r, pp, vocab_parallel=tp > 1, etp=etp, sequence_parallel=sp)
                  for r in (ranks[0], ranks[-1])), key=lambda p: p.total)
    dp_bw = acc.intra_node_bandwidth if tp * dp <= g else acc.inter_node_bandwidth
    dp_comm, dp_exposed, gather = dp_reduction_seconds(w, params, tp, dp, ep, etp, dp_bw, compute_mb * 2 / 3)
    edp = max(1, dp * tp // (ep * etp))
    partial = params.partial
    sharded = ((params.dense - partial) / dp + partial / (dp * tp) + params.expert / edp) if w.zero else params.total
    opt_bytes = params.total * (prec.weight + prec.grad) + 2 * sharded * (prec.master + prec.adam)
    optimizer = opt_bytes / acc.memory_bandwidth

    step = m * slot + bubble + dp_exposed + gather + optimizer
    tokens_per_step = m * dp * tokens
    useful = 3 * flops_per_token(cfg, w.seq_len) * tokens_per_step
    return StepEstimate(
        microbatches=m, tokens_per_step=tokens_per_step,
        compute_s=m * compute_mb, tp_comm_s=m * tp_mb, ep_comm_s=m * ep_mb, pp_comm_s=m * pp_mb,
        bubble_s=bubble, dp_comm_exposed_s=dp_exposed + gather, optimizer_s=optimizer, step_s=step,
        modeled_mfu=useful / (n_gpus * acc.peak_flops * step), dp_comm_s=dp_comm, param_gather_s=gather,
    )
