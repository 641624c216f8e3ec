"""The attention role: this worker's heads of every layer plus the attention side's replicated
pieces, applied to its slice of each micro-batch's tokens.

Data flow per layer (``S`` = this worker's token slice, collectives over the attention pool):
  h_S = ln1(x_S) --all-gather--> h --my heads--> partial --reduce-scatter--> a_S
  x1_S, h2_S, logits_S = post_attention(x_S, a_S); top-k --all-gather indices--> capacity, counts
  rows of h2_S sorted by expert --send--> MoE workers --recv--> expert outputs
  x_S' = x1_S + combine(expert outputs, gate probabilities)
Backward runs the same path in reverse: an all-gather's backward is a reduce-scatter and the
other way round. Every piece between two transfers is its own small autograd graph whose inputs
are leaves, so a transfer sits between two explicit ``backward`` calls.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from ma_ray.model import dispatch as D
from ma_ray.model import router as R
from ma_ray.model.stacks import AttentionStack
from ma_ray.parallel.step_time import FORWARD_SHARE
from ma_ray.parallel.placement import ATTENTION, replicate
from ma_ray.parallel.shares import balanced_ranges
from ma_ray.runtime import residuals
from ma_ray.runtime import schedule as S
from ma_ray.runtime.role import Role, backward, grad_of, release_output, replayed_rng, rng_state
from ma_ray.runtime.step_metrics import WorkerStepResult
from ma_ray.runtime.timing import ATTENTION_COLLECTIVES, ATTENTION_COMPUTE, COMPRESSION, GRAD_SYNC, WAIT_MOE
from ma_ray.runtime.transport import chunk_sizes


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


class AttentionRole(Role):
    kind = ATTENTION

    def __init__(self, cfg, plan, me, links, device, transport, durations, dataset):
        stack = AttentionStack(cfg, me.heads)
        super().__init__(cfg, plan, me, links, device, transport, durations, stack, stack.global_slices())
        self.stack = stack
        self.dataset = dataset
        t, moe = cfg.train, cfg.moe
        self.seq, self.batch = t.seq_length, t.micro_batch_size
        self.tokens = self.batch * self.seq
        self.slice_sizes = [len(r) for r in balanced_ranges(self.tokens, plan.attention_gpus)]
        my = balanced_ranges(self.tokens, plan.attention_gpus)[me.rank]
        self.lo, self.hi = my.start, my.stop
        self.top_k, self.num_experts = moe.top_k, moe.num_experts
        self.capacity = R.capacity(self.tokens, moe.top_k, moe.num_experts, moe.capacity_factor, moe.expert_capacity)
        self.accum = t.gradient_accumulation_steps  # the step's, over every replica: the losses' divisor
        # This replica's micro-batches: the step's, in order, cut into equal shares.
        self.first_micro = plan.replica * cfg.micro_batches_per_replica
        # Each MoE worker's (gpu, first expert, end): the workers hold consecutive ranges of the
        # experts in order, so each one's rows are one block of the rows sorted by expert.
        if [e for w in plan.moe_workers() for e in w.experts] != list(range(self.num_experts)):
            raise ValueError("the MoE workers must hold consecutive ranges of the experts, in order")
        self.moe_workers = [(w.gpu, w.experts[0], w.experts[-1] + 1) for w in plan.moe_workers()]
        # A replicated parameter's gradient is summed over the pool; rank 0 counts it in the norm.
        self.side_params = list(self.stack.side.parameters())
        # Modelled seconds (zero computing for real): this worker's stage, split forward and
        # backward, and one all-gather or reduce-scatter of a micro-batch's hidden states, and
        # the all-reduce of the replicated gradients, over the pool's collectives.
        stage = durations.attention_stage_s(len(me.heads), (self.hi - self.lo) * durations.token_scale)
        self.modelled_fwd, self.modelled_bwd = FORWARD_SHARE * stage, (1 - FORWARD_SHARE) * stage
        self.aggregation = links.aggregation
        self.gradients = links.gradients  # the replicated gradients' all-reduce, over every replica
        hierarchical = cfg.comm.hierarchical_allreduce
        # What a micro-batch's hidden states and routing choices stand for at the configured
        # shapes (zero computing for real: the aggregation counts the tensors' own bytes).
        self.rows_bytes = durations.rows_bytes(self.tokens)
        self.index_bytes = self.tokens * self.top_k * 8 * durations.token_scale if self.rows_bytes else 0.0
        self.modelled_ring = durations.pool_collective_s(plan, self.rows_bytes, False, hierarchical, self.slice_sizes)
        # The replicated gradients' all-reduce: its cross-node level sends what the reducer
        # sends (comm.cross_node), and compressing takes the kernels' time on this GPU's pieces.
        # (seconds, of which kernels) by whether the step compresses: a compressing reducer
        # sends dense during its warm-up (comm.compression_warmup_steps).
        self.flat_numel = sum(p.numel() for p in self.side_params)
        self.hierarchical = hierarchical
        self.modelled_sync: Dict[bool, tuple] = {}

    def op_handlers(self):
        return {S.EMBED: self.embed, S.ATTN_FWD: self.attn_fwd, S.DISPATCH: self.dispatch, S.COMBINE: self.combine,
                S.HEAD: self.head, S.COMBINE_BWD: self.combine_bwd, S.DISPATCH_BWD: self.dispatch_bwd,
                S.ATTN_BWD: self.attn_bwd, S.EMBED_BWD: self.embed_bwd}

    # -- per-step state ---------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        self.step = step
        self.state: Dict = {}
        self.x: Dict = {}  # (micro, layer) -> residual leaf entering that layer (layer L: final)
        # ce, aux, z (this slice's shares) and the (token, slot) assignments past capacity (whole
        # micro-batches), summed on the device and read once, at the step's end: a read per
        # micro-batch and layer would make the host wait for the device each time.
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.torch_device)
        self.aggregation.reset_counts()
        if self.gradients is not self.aggregation:
            self.gradients.reset_counts()
        self.gradients.reducer.begin_step(step)

    def end_micro_batches(self) -> WorkerStepResult:
        ce, aux, z, dropped = self.sums.tolist()
        m = self.cfg.moe
        assignments = self.tokens * self.top_k * self.cfg.micro_batches_per_replica * self.cfg.model.num_layers
        return WorkerStepResult(grad_norm=0.0, lr=0.0, loss_share=ce + m.aux_loss_alpha * aux + m.router_z_loss_coef * z,
                                ce_share=ce, aux_share=aux, z_share=z, dropped_fraction=dropped / assignments)

    def synchronize_gradients(self) -> None:
        grads = [p.grad for p in self.side_params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        allreduce_s, compression_s = self._modelled_sync()
        with self.device.collective(GRAD_SYNC, allreduce_s):
            self.gradients.allreduce(flat, self.durations.replicated_grad_bytes, [g.numel() for g in grads])
        self.timer.add(COMPRESSION, compression_s)
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n

    def _modelled_sync(self) -> tuple:
        """(seconds, of which compression kernels) of this step's replicated all-reduce."""
        reducer = self.gradients.reducer
        if reducer.compresses not in self.modelled_sync:
            self.modelled_sync[reducer.compresses] = self.durations.replicated_allreduce_s(
                replicate(self.plan.for_replica(0), self.plan.replicas), self.hierarchical, reducer.wire_factor,
                reducer.compresses, max(1, len(self.gradients.held_ranges(self.flat_numel))))
        return self.modelled_sync[reducer.compresses]

    def step_level_bytes(self) -> Dict[str, float]:
        out = dict(self.aggregation.level_bytes)
        if self.gradients is not self.aggregation:
            for level, n in self.gradients.level_bytes.items():
                out[level] = out.get(level, 0.0) + n
        return out

    # -- gradient compression's residuals (runtime.residuals) ---------------------------------

    def residual_parts(self) -> List[residuals.Part]:
        return residuals.parts_of(self.me.node, self.gradients.held_ranges(self.flat_numel),
                                  self.gradients.reducer.residuals())

    def load_residuals(self, parts, nodes: set) -> None:
        wanted = self.gradients.held_ranges(self.flat_numel)
        self.gradients.reducer.load_residuals(residuals.assemble(wanted, parts, nodes), self.torch_device,
                                              self.side_params[0].dtype)

    def norm_parameters(self):
        if self.me.rank == 0:
            return list(self.module.parameters())
        return self.sharded_parameters()

    def sharded_parameters(self) -> list:
        return [p for shard in self.stack.shards for p in shard.parameters()]

    # -- forward ops ------------------------------------------------------------------------

    def embed(self, mb: int, _layer: int) -> None:
        ids, targets = self.dataset.micro_batch(self.step, self.first_micro + mb)
        # The input comes from the host: this slice's token ids and targets, one copy, which
        # waits for nothing the device computes (from pinned memory on a GPU, so it does not
        # block the host either).
        host = torch.stack([ids.reshape(-1)[self.lo:self.hi], targets.reshape(-1)[self.lo:self.hi]])
        if self.torch_device.type == "cuda":
            host = host.pin_memory()
        flat_ids, flat_targets = host.to(self.torch_device, non_blocking=True)
        positions = torch.arange(self.lo, self.hi, device=self.torch_device) % self.seq
        with self.device.compute(ATTENTION_COMPUTE), self._autocast():
            x = self.stack.side.embed(flat_ids, positions)
        self.state[mb, "embed"] = x
        self.state[mb, "targets"] = flat_targets
        self.x[mb, 0] = _leaf(x)

    def attn_fwd(self, mb: int, layer: int) -> None:
        side, shard = self.stack.side, self.stack.shards[layer]
        x = self.x[mb, layer]
        st = {}
        # Checkpointing covers the whole attention block, the pool's all-gather included: its
        # forward keeps nothing, and attn_bwd recomputes the LayerNorm, gathers again and reruns
        # the heads from this RNG state (one more all-gather per layer and micro-batch, where
        # keeping the gathered micro-batch would cost tokens x hidden per layer on every GPU).
        recompute = self.checkpointing
        with torch.set_grad_enabled(not recompute):
            h_slice, h = self._gathered_ln1(layer, x)
            if recompute:
                st["rng"] = rng_state(self.torch_device)
            else:
                st.update(h_slice=h_slice, h=h)
            # The whole forward stage's modelled time is queued here, where the heads compute.
            with self.device.compute(ATTENTION_COMPUTE, self.modelled_fwd), self._autocast():
                partial = shard(h.view(self.batch, self.seq, -1))
            a = _leaf(self._scatter(partial.detach().view(self.tokens, -1)))
        if not recompute:
            release_output(partial)
            st["partial"] = partial
        del h_slice, h
        with self.device.compute(ATTENTION_COMPUTE), self._autocast():
            x1, h2, logits = side.post_attention(layer, x, a)
            probs, topk_prob, topk_idx = R.route(logits, self.top_k, self.cfg.moe.norm_topk_prob)
        with self.device.collective(ATTENTION_COLLECTIVES):  # a few bytes a token: no time to model
            all_idx = self.aggregation.gather_tokens(topk_idx, self.slice_sizes, self.index_bytes)
        with self.device.compute(ATTENTION_COMPUTE):
            keep_all = R.capacity_keep(all_idx, self.num_experts, self.capacity)
            keep = keep_all[self.lo:self.hi]
            counts = R.expert_counts(all_idx, self.num_experts, self.seq, self.cfg.moe.seq_aux)
            aux = R.load_balance_loss(probs, self.lo, counts, self.seq, self.tokens, self.top_k, self.cfg.moe.seq_aux)
            z = R.z_loss(logits, self.tokens)
            router_loss = (self.cfg.moe.aux_loss_alpha * aux + self.cfg.moe.router_z_loss_coef * z) / self.accum
            order, per_expert = D.expert_order(topk_idx, keep, self.num_experts)
            self.sums[1] += aux.detach().double() / self.accum
            self.sums[2] += z.detach().double() / self.accum
            self.sums[3] += (~keep_all).sum()
        # The one host read of this layer and micro-batch: the slice's kept rows per expert,
        # which size every block of the exchange with the MoE pool (both ways, forward and
        # backward) and cut the kept assignments out of ``order``.
        kept_rows = per_expert.tolist()
        sizes = [sum(kept_rows[lo:hi]) for _, lo, hi in self.moe_workers]
        order = order[:sum(sizes)]
        with self.device.compute(ATTENTION_COMPUTE):
            rows = D.gather_rows(h2, order, self.top_k)
        st.update(a=a, x1=x1, topk_prob=topk_prob, rows=rows, router_loss=router_loss, order=order,
                  per_expert=per_expert, sizes=sizes)
        self.state[mb, layer, "fwd"] = st

    def dispatch(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer, "fwd"]
        blocks, sends = torch.split(st["rows"].detach().to(self.transfer_dtype), st["sizes"]), []
        for (dst, lo, hi), block in zip(self.moe_workers, blocks):
            sends.append(self.transport.send(st["per_expert"][lo:hi], dst))
            sends += self.transport.send_chunks(block, dst, self.modelled_bytes)
        st["sends"] = sends
        # Backward needs only the rows' graph; where the transfer dtype is theirs, the sends
        # hold the storage until they complete.
        release_output(st["rows"])

    def combine(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer, "fwd"]
        out = _leaf(self._receive_from_moe(st))
        x1, topk_prob = _leaf(st["x1"]), _leaf(st["topk_prob"])
        with self.device.compute(ATTENTION_COMPUTE), self._autocast():
            y = D.combine(self.hi - self.lo, out, st["order"], topk_prob, self.top_k)
            x2 = self.stack.side.post_moe(x1, y)
        self.state[mb, layer, "combine"] = dict(out=out, x1=x1, topk_prob=topk_prob, x2=x2)
        self.x[mb, layer + 1] = _leaf(x2)

    def head(self, mb: int, _layer: int) -> None:
        x = self.x[mb, self.cfg.model.num_layers]
        with self.device.compute(ATTENTION_COMPUTE), self._autocast():
            ce = self.stack.side.ce_sum(x, self.state.pop((mb, "targets"))) / (self.tokens * self.accum)
            ce.backward()
            self.sums[0] += ce.detach().double()

    # -- backward ops -----------------------------------------------------------------------

    def combine_bwd(self, mb: int, layer: int) -> None:
        c = self.state.pop((mb, layer, "combine"))
        st = self.state[mb, layer, "fwd"]
        with self.device.compute(ATTENTION_COMPUTE):
            torch.autograd.backward(c["x2"], self.x.pop((mb, layer + 1)).grad)
        st["x1_grad"], st["topk_prob_grad"] = grad_of(c["x1"]), grad_of(c["topk_prob"])
        blocks = torch.split(grad_of(c["out"]), st["sizes"])
        st["sends"] = [ticket for (dst, _, _), block in zip(self.moe_workers, blocks)
                       for ticket in self.transport.send_chunks(block.to(self.transfer_dtype), dst,
                                                                self.modelled_bytes)]

    def dispatch_bwd(self, mb: int, layer: int) -> None:
        st = self.state[mb, layer, "fwd"]
        grad_rows = self._receive_from_moe(st)
        with self.device.compute(ATTENTION_COMPUTE):
            backward([st["x1"], st["topk_prob"], st["rows"], st["router_loss"]],
                     [st["x1_grad"], st["topk_prob_grad"], grad_rows.to(st["rows"].dtype),
                      torch.ones_like(st["router_loss"])])

    def attn_bwd(self, mb: int, layer: int) -> None:
        st = self.state.pop((mb, layer, "fwd"))
        grad_partial = self._gather(st["a"].grad).view(self.batch, self.seq, -1)
        if "rng" in st:  # checkpointed: the block again, from the layer's input
            h_slice, h = self._gathered_ln1(layer, self.x[mb, layer])
            with self.device.compute(ATTENTION_COMPUTE, self.modelled_bwd):
                with replayed_rng(self.torch_device, st["rng"]), self._autocast():
                    partial = self.stack.shards[layer](h.view(self.batch, self.seq, -1))
                release_output(partial)
                backward([partial], [grad_partial])
        else:
            h_slice, h, partial = st["h_slice"], st["h"], st["partial"]
            with self.device.compute(ATTENTION_COMPUTE, self.modelled_bwd):
                backward([partial], [grad_partial])
        del partial, grad_partial
        grad_h_slice = self._scatter(h.grad)
        del h
        with self.device.compute(ATTENTION_COMPUTE):
            backward([h_slice], [grad_h_slice])

    def embed_bwd(self, mb: int, _layer: int) -> None:
        with self.device.compute(ATTENTION_COMPUTE):
            torch.autograd.backward(self.state.pop((mb, "embed")), self.x.pop((mb, 0)).grad)

    # -- helpers ----------------------------------------------------------------------------

    def _gathered_ln1(self, layer: int, x: torch.Tensor):
        """This slice's LayerNorm output (a graph root whose data goes once sent) and the whole
        micro-batch's, gathered over the pool (a leaf when grad is on). The pool sends it in
        the transfer dtype, the bytes the time model counts, not the fp32 LayerNorm gives under
        autocast: the heads' matmuls round it to that dtype anyway. It comes back in the master
        dtype, so the heads' input gradient is summed over Q, K and V and over the pool in it,
        as the reference's one matmul over all heads sums it: in bf16 those sums would round
        several times more, enough to change a routing choice a few steps on."""
        with self.device.compute(ATTENTION_COMPUTE), self._autocast():
            h_slice = self.stack.side.pre_attention(layer, x)
        h = self._gather(h_slice.detach().to(self.transfer_dtype)).to(self.master_dtype)
        release_output(h_slice)
        return h_slice, _leaf(h) if torch.is_grad_enabled() else h

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        with self.device.collective(ATTENTION_COLLECTIVES, self.modelled_ring):
            return self.aggregation.gather_tokens(local, self.slice_sizes, self.rows_bytes)

    def _scatter(self, full: torch.Tensor) -> torch.Tensor:
        """Reduce-scatter ``full``: the partial output projection (the transfer dtype), or the
        gathered input's gradient (the master dtype, ``_gathered_ln1``), each timed at its own
        bytes."""
        scale = full.element_size() / torch.empty((), dtype=self.transfer_dtype).element_size()
        with self.device.collective(ATTENTION_COLLECTIVES, self.modelled_ring * scale):
            return self.aggregation.scatter_tokens(full, self.slice_sizes, self.rows_bytes * scale)

    def _receive_from_moe(self, st) -> torch.Tensor:
        """Every MoE worker's block for this (micro-batch, layer), chunk by chunk, in dispatch
        order; also waits for the sends this exchange answers, whose buffers can go now."""
        hidden = self.cfg.model.hidden_size
        blocks = [(src, [torch.empty(n, hidden, dtype=self.transfer_dtype, device=self.torch_device)
                         for n in chunk_sizes(size, self.chunk_rows)])
                  for (src, _, _), size in zip(self.moe_workers, st["sizes"])]
        chunks = list(self.transport.receive_blocks(blocks, lambda: self.device.waiting(WAIT_MOE)))
        self.wait_sends(st.pop("sends"), WAIT_MOE)
        if not chunks:
            return torch.empty(0, hidden, dtype=self.transfer_dtype, device=self.torch_device)
        return torch.cat(chunks)
