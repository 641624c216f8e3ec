"""The sharded pieces composed in one process equal the reference model (no Ray).

The composition runs the same stage functions an attention worker and a MoE worker run, with
the collectives replaced by their in-process meaning: all-gather = concatenation of token slices,
reduce-scatter = sum then slice; replicated attention-side parameters are one module, so autograd
sums their per-slice gradients exactly as the pool's all-reduce does.
"""

import pytest
import torch

from ma_ray import config as C
from ma_ray.model import dispatch as D
from ma_ray.model import router as R
from ma_ray.model.attention import AttentionShard
from ma_ray.verify.compare import gradient_error, scalar_relative_error
from ma_ray.model.attention_side import AttentionSideParams
from ma_ray.model.experts import ExpertGroup
from ma_ray.model.naming import export_global, import_global, initialize, prefixed
from ma_ray.model.reference import MoETransformer, combine_loss
from ma_ray.parallel.shares import balanced_ranges


def ranges(n, parts):
    return [list(r) for r in balanced_ranges(n, parts)]


def make_cfg(**over):
    base = {
        "model.num_layers": 2, "model.hidden_size": 24, "model.num_attention_heads": 6,
        "model.attention_head_size": 4, "model.intermediate_size": 32, "model.vocab_size": 50,
        "model.max_position_embeddings": 16, "model.hidden_dropout_prob": 0.0,
        "model.attention_probs_dropout_prob": 0.0, "moe.num_experts": 5, "moe.top_k": 2,
        "cluster.num_nodes": 1, "cluster.gpus_per_node": 5, "cluster.attention_gpus": 3,
        "balance.min_attention_gpus": 1, "balance.max_attention_gpus": 4,
        "train.seq_length": 8, "train.micro_batch_size": 3, "train.batch_size": 3,
        "train.gradient_accumulation_steps": 1, "train.mixed_precision": "fp32",
        "balance.time_coef_layout": None,
    }
    base.update(over)
    return C.Config().replace(**base)


class Composed(torch.nn.Module):
    """Attention shards over ``head_groups``, expert groups over ``expert_groups``, tokens cut
    into ``len(head_groups)`` slices, one per attention worker."""

    def __init__(self, cfg, head_groups, expert_groups):
        super().__init__()
        self.cfg = cfg
        L = cfg.model.num_layers
        self.side = AttentionSideParams(cfg)
        self.shards = torch.nn.ModuleList(
            torch.nn.ModuleList(AttentionShard(cfg.model, g) for g in head_groups) for _ in range(L))
        self.groups = torch.nn.ModuleList(
            torch.nn.ModuleList(ExpertGroup(cfg.model, g) for g in expert_groups) for _ in range(L))

    def global_slices(self):
        out = list(prefixed(self.side.global_slices(), "side"))
        for l in range(self.cfg.model.num_layers):
            for i, s in enumerate(self.shards[l]):
                out += prefixed(s.global_slices(l), f"shards.{l}.{i}")
            for i, e in enumerate(self.groups[l]):
                out += prefixed(e.global_slices(l), f"groups.{l}.{i}")
        return out

    def forward(self, ids, targets):
        cfg, moe = self.cfg, self.cfg.moe
        b, t = ids.shape
        n, k, E = b * t, moe.top_k, moe.num_experts
        slices = ranges(n, len(self.shards[0]))
        flat_ids, flat_tg = ids.reshape(-1), targets.reshape(-1)
        pos = torch.arange(t).repeat(b)
        xs = [self.side.embed(flat_ids[s], pos[s]) for s in slices]
        cap = R.capacity(n, k, E, moe.capacity_factor, moe.expert_capacity)
        aux = z = torch.zeros(())
        for l in range(cfg.model.num_layers):
            h = torch.cat([self.side.pre_attention(l, x) for x in xs]).reshape(b, t, -1)   # all-gather
            partial = sum(shard(h) for shard in self.shards[l]).reshape(n, -1)              # reduce-
            routed = [self.side.post_attention(l, x, partial[s]) for x, s in zip(xs, slices)]  # scatter
            probs, topk_p, topk_i = zip(*[R.route(logits, k, moe.norm_topk_prob) for _, _, logits in routed])
            all_idx = torch.cat(topk_i)                                                     # all-gather
            keep = R.capacity_keep(all_idx, E, cap)
            counts = R.expert_counts(all_idx, E, t, moe.seq_aux)
            new_xs = []
            for r, (s, (x1, h2, logits)) in enumerate(zip(slices, routed)):
                order, per_expert = D.dispatch_order(topk_i[r], keep[s], E)
                rows = D.gather_rows(h2, order, k)
                outs, lo = [], 0
                for group in self.groups[l]:                                                # to MoE workers
                    c = per_expert[group.experts].tolist()
                    outs.append(group(rows[lo:lo + sum(c)], c))
                    lo += sum(c)
                y = D.combine(len(s), torch.cat(outs), order, topk_p[r], k)
                new_xs.append(self.side.post_moe(x1, y))
                aux = aux + R.load_balance_loss(probs[r], s[0], counts, t, n, k, moe.seq_aux)
                z = z + R.z_loss(logits, n)
            xs = new_xs
        ce = sum(self.side.ce_sum(x, flat_tg[s]) for x, s in zip(xs, slices)) / n
        return combine_loss(cfg, ce, aux, z)


def rel_err(a, b):
    return scalar_relative_error(float(a.detach()), float(b.detach()))


def check_equivalence(cfg, head_groups, expert_groups, seed=0, expect_drops=None):
    torch.manual_seed(seed)
    ref = MoETransformer(cfg, seed=seed)
    comp = Composed(cfg, head_groups, expert_groups)
    import_global(comp, comp.global_slices(), export_global(ref, ref.global_slices()))
    b, t = cfg.train.micro_batch_size, cfg.train.seq_length
    ids = torch.randint(0, cfg.model.vocab_size, (b, t))
    tg = torch.randint(0, cfg.model.vocab_size, (b, t))
    lr, lc = ref(ids, tg), comp(ids, tg)
    for part in ("total", "ce", "aux", "z"):
        assert rel_err(getattr(lc, part), getattr(lr, part)) < 1e-5, part
    lr.total.backward()
    lc.total.backward()
    gr = export_global(ref, ref.global_slices(), "grad")
    gc = export_global(comp, comp.global_slices(), "grad")
    assert len(gr) == len(ref.global_slices())
    err, worst = gradient_error(gc, gr)
    assert err < 1e-5, (worst, err)
    if expect_drops is not None:
        # Confirm the case really exercises (or avoids) capacity drops.
        x = ref.drop(ref.tokens(ids) + ref.positions(torch.arange(t)))
        x = x + ref.blocks[0].attn(ref.blocks[0].ln1(x))
        logits = ref.blocks[0].moe.gate(ref.blocks[0].ln2(x).reshape(b * t, -1))
        _, _, idx = R.route(logits, cfg.moe.top_k, cfg.moe.norm_topk_prob)
        cap = R.capacity(b * t, cfg.moe.top_k, cfg.moe.num_experts, cfg.moe.capacity_factor, cfg.moe.expert_capacity)
        dropped = int((~R.capacity_keep(idx, cfg.moe.num_experts, cap)).sum())
        assert (dropped > 0) == expect_drops


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_uneven_shards_match_reference(top_k, seq_aux, norm_topk_prob):
    cfg = make_cfg(**{"moe.top_k": top_k, "moe.seq_aux": seq_aux, "moe.norm_topk_prob": norm_topk_prob})
    # 6 heads over 4 workers (2,2,1,1); 5 experts over 2 groups (3,2).
    check_equivalence(cfg, [[0, 1], [2, 3], [4], [5]], [[0, 1, 2], [3, 4]])


@pytest.mark.parametrize("cf, drops", [(0.5, True), (4.0, False)])
def test_capacity_drops_match_reference(cf, drops):
    cfg = make_cfg(**{"moe.capacity_factor": cf})
    check_equivalence(cfg, [[0, 1, 2], [3, 4, 5]], [[0], [1, 2, 3, 4]], expect_drops=drops)


def test_tokens_dropped_by_every_expert_pass_through_residual():
    # Capacity 1: almost every token loses all its experts; the composition must still match.
    cfg = make_cfg(**{"moe.expert_capacity": 1})
    check_equivalence(cfg, [[0], [1], [2], [3], [4], [5]], [[0, 1], [2], [3, 4]], expect_drops=True)


@pytest.mark.parametrize("seed", range(4))
def test_random_configs_match_reference(seed):
    g = torch.Generator().manual_seed(100 + seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    heads, d, experts = rnd(2, 7), rnd(2, 5), rnd(2, 7)
    mb = rnd(1, 3)
    cfg = make_cfg(**{
        "model.num_layers": rnd(1, 3), "model.num_attention_heads": heads, "model.attention_head_size": d,
        "model.hidden_size": heads * d, "moe.num_experts": experts, "moe.top_k": rnd(1, min(2, experts)),
        "moe.capacity_factor": [0.75, 1.0, 1.5][rnd(0, 2)], "train.micro_batch_size": mb,
        "train.batch_size": mb, "train.gradient_accumulation_steps": 1,
        "balance.max_attention_gpus": heads, "cluster.attention_gpus": 1,
        "cluster.gpus_per_node": experts + 1, "balance.min_attention_gpus": 1,
    })
    workers = rnd(1, heads)
    groups = rnd(1, experts)
    check_equivalence(cfg, ranges(heads, workers), ranges(experts, groups), seed=seed)


def test_shard_composition_holds_every_parameter_once():
    cfg = make_cfg()
    comp = Composed(cfg, [[0, 1, 2], [3, 4, 5]], [[0, 1], [2, 3, 4]])
    ref = MoETransformer(cfg)
    names_c = [s.name for s in comp.global_slices()]
    assert sorted(names_c) == sorted(s.name for s in ref.global_slices())
    assert len(set(names_c)) == len(names_c)
    total = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in comp.parameters()) == total


def test_layout_independent_init_matches_reference():
    cfg = make_cfg()
    ref = MoETransformer(cfg, seed=7)
    shard = AttentionShard(cfg.model, [4, 1])
    group = ExpertGroup(cfg.model, [3])
    initialize(shard, list(shard.global_slices(1)), cfg.model.initializer_range, 7)
    initialize(group, list(group.global_slices(0)), cfg.model.initializer_range, 7)
    want = export_global(ref, ref.global_slices())
    for name, value in {**export_global(shard, shard.global_slices(1)), **export_global(group, group.global_slices(0))}.items():
        assert torch.equal(value, want[name]), name


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_expert_order_is_the_kept_order_at_a_fixed_size(top_k):
    """``expert_order`` (argsort by expert with the dropped last, counts by scatter: sizes fixed,
    no host read) gives exactly the order and counts of the nonzero + bincount formulation it
    replaced: kept assignments by expert, token order within one, then the dropped ones."""
    g = torch.Generator().manual_seed(top_k)
    n, experts = 37, 5
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(n)])
    keep = R.capacity_keep(idx, experts, R.capacity(n, top_k, experts, 0.75))
    assert not keep.all()  # some assignments are dropped
    order, counts = D.expert_order(idx, keep, experts)
    assert order.shape == (n * top_k,) and counts.shape == (experts,) and counts.dtype == torch.int64
    flat = idx.reshape(-1)
    kept = torch.nonzero(keep.reshape(-1), as_tuple=True)[0]
    want = kept[torch.argsort(flat[kept], stable=True)]
    assert torch.equal(order[:len(want)], want)
    assert torch.equal(order[len(want):], torch.nonzero(~keep.reshape(-1), as_tuple=True)[0])
    assert torch.equal(counts, torch.bincount(flat[kept], minlength=experts))
    assert int(counts.sum()) == len(want)
    cut, same = D.dispatch_order(idx, keep, experts)
    assert torch.equal(cut, want) and torch.equal(same, counts)
    # Nothing kept, and everything kept.
    none, zero = D.expert_order(idx, torch.zeros_like(keep), experts)
    assert torch.equal(none, torch.arange(n * top_k)) and not zero.any()
    every, full = D.expert_order(idx, torch.ones_like(keep), experts)
    assert torch.equal(every, torch.argsort(flat, stable=True))
    assert torch.equal(full, torch.bincount(flat, minlength=experts))


# --- router: the load-balancing loss in fp64, norm_topk_prob ----------------------------------------

def aux_by_loops(probs, idx, seq_len, top_k, seq_aux):
    """The load-balancing loss written out in Python floats: per sequence (seq_aux) or over the
    micro-batch, sum_e f_e * P_e with f_e = E * count_e / (top_k * tokens), P_e the mean
    probability; averaged over sequences when seq_aux."""
    p, chosen = probs.tolist(), idx.tolist()
    n, num_experts = len(p), len(p[0])
    groups = [range(s, s + seq_len) for s in range(0, n, seq_len)] if seq_aux else [range(n)]
    total = 0.0
    for tokens in groups:
        for e in range(num_experts):
            count = sum(1 for t in tokens for j in range(top_k) if chosen[t][j] == e)
            f = num_experts * count / (top_k * len(tokens))
            total += f * sum(p[t][e] for t in tokens) / len(tokens)
    return total / len(groups)


@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balance_loss_is_fp64_accurate(seq_aux, top_k):
    g = torch.Generator().manual_seed(3)
    batch, seq, experts = 3, 7, 6
    n = batch * seq
    logits = torch.randn(n, experts, generator=g, dtype=torch.float64, requires_grad=True)
    probs, _, idx = R.route(logits, top_k, False)
    counts = R.expert_counts(idx, experts, seq, seq_aux)
    aux = R.load_balance_loss(probs, 0, counts, seq, n, top_k, seq_aux)
    assert aux.dtype == torch.float64
    want = aux_by_loops(probs.detach(), idx, seq, top_k, seq_aux)
    assert abs(aux.item() - want) <= 1e-12 * abs(want)
    # The slices of the attention workers add up to the same loss.
    parts = sum(R.load_balance_loss(probs[lo:hi], lo, counts, seq, n, top_k, seq_aux)
                for lo, hi in ((0, 5), (5, 13), (13, n)))
    assert abs(parts.item() - want) <= 1e-12 * abs(want)
    # The router's gradient, against the same loss built another way: f from integer counts of
    # the chosen experts, P from a token-to-group averaging matrix.
    chosen = idx.tolist()
    groups = [list(range(s, s + seq)) for s in range(0, n, seq)] if seq_aux else [list(range(n))]
    average = torch.zeros(len(groups), n, dtype=torch.float64)
    f = torch.zeros(len(groups), experts, dtype=torch.float64)
    for gi, tokens in enumerate(groups):
        for t in tokens:
            average[gi, t] = 1.0 / len(tokens)
            for e in chosen[t]:
                f[gi, e] += experts / (top_k * len(tokens))
    other = ((average @ torch.softmax(logits, dim=-1)) * f).sum() / len(groups)
    (grad,) = torch.autograd.grad(aux, logits)
    (want_grad,) = torch.autograd.grad(other, logits)
    assert torch.allclose(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert float((grad - want_grad).abs().max()) <= 1e-12 * float(want_grad.abs().max())


def test_expert_counts_are_exact_integers():
    idx = torch.tensor([[0, 2], [2, 1], [2, 0], [1, 0]])
    assert R.expert_counts(idx, 3, 2, False).tolist() == [3, 2, 3]
    assert R.expert_counts(idx, 3, 2, True).tolist() == [[1, 1, 2], [2, 1, 1]]
    assert not R.expert_counts(idx, 3, 2, False).is_floating_point()


def test_norm_topk_prob_renormalises_only_above_top_1():
    """DeepSeek-MoE's meaning: top-1 keeps its raw softmax probability, top-k > 1 sums to 1."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0], [0.0, 0.3, 0.2, -0.4]], dtype=torch.float64)
    by_hand = torch.exp(logits) / torch.exp(logits).sum(dim=-1, keepdim=True)
    for norm in (True, False):
        probs, top1, idx1 = R.route(logits, 1, norm)
        assert torch.allclose(probs, by_hand, rtol=1e-15, atol=0)
        assert idx1.tolist() == [[0], [1]]
        assert torch.equal(top1, probs.gather(1, idx1))  # the raw probability, not 1.0
        assert float(top1.max()) < 0.7
    probs, top2, idx2 = R.route(logits, 2, True)
    assert idx2.tolist() == [[0, 3], [1, 2]]
    raw = probs.gather(1, idx2)
    assert torch.equal(top2, raw / raw.sum(dim=-1, keepdim=True))
    assert torch.allclose(top2.sum(dim=-1), torch.ones(2, dtype=torch.float64), rtol=1e-15, atol=0)
    _, top2_raw, _ = R.route(logits, 2, False)
    assert torch.equal(top2_raw, raw)


def test_top_1_with_norm_topk_prob_keeps_the_router_in_the_output():
    """With the raw probability as weight, the MoE output depends on the gate (it would not with 1.0)."""
    cfg = make_cfg(**{"moe.top_k": 1, "moe.norm_topk_prob": True, "train.mixed_precision": "fp64"})
    ref = MoETransformer(cfg, seed=0).double()
    h = torch.randn(2, 8, cfg.model.hidden_size, dtype=torch.float64)
    out, _, _ = ref.blocks[0].moe(h)
    (grad,) = torch.autograd.grad(out.square().sum(), ref.blocks[0].moe.gate.weight)
    assert float(grad.abs().max()) > 0


# --- model.hidden_act ------------------------------------------------------------------------------

ACTS_BY_HAND = {
    "gelu": lambda x: 0.5 * x * (1.0 + torch.erf(x / 2.0 ** 0.5)),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "silu": lambda x: x / (1.0 + torch.exp(-x)),
}


def test_hidden_act_names_are_one_list():
    import typing

    from ma_ray.model import experts as X
    from ma_ray.model import reference as REF

    names = set(typing.get_args(typing.get_type_hints(C.ModelConfig)["hidden_act"]))
    assert names == set(X.ACTIVATIONS) == set(REF.ACTIVATIONS) == set(ACTS_BY_HAND)


@pytest.mark.parametrize("act", sorted(ACTS_BY_HAND))
def test_experts_apply_the_configured_activation(act):
    cfg = make_cfg(**{"model.hidden_act": act})
    group = ExpertGroup(cfg.model, [1, 3]).double()
    initialize(group, list(group.global_slices(0)), 0.5, 0)
    ref = MoETransformer(cfg, seed=0).double()
    import_global(ref, ref.global_slices(), {**export_global(ref, ref.global_slices()),
                                            **export_global(group, group.global_slices(0))})
    rows = torch.randn(5, cfg.model.hidden_size, dtype=torch.float64)
    got = group(rows, [2, 3])
    for i, (lo, hi) in enumerate(((0, 2), (2, 5))):
        x = rows[lo:hi]
        inner = ACTS_BY_HAND[act](x @ group.fc1_weight[i].T + group.fc1_bias[i])
        want = inner @ group.fc2_weight[i].T + group.fc2_bias[i]
        assert torch.allclose(got[lo:hi], want, rtol=1e-12, atol=1e-12)
        assert torch.allclose(ref.blocks[0].moe.experts[group.experts[i]](x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_shards_match_reference_with_other_activations(act):
    cfg = make_cfg(**{"model.hidden_act": act})
    check_equivalence(cfg, [[0, 1], [2, 3], [4], [5]], [[0, 1, 2], [3, 4]])
