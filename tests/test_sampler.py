"""Tests of flowrl.flow.sampler: every plan kind end to end (an analytic Gaussian policy and the tiny
SD3 / Flux pipelines), determinism, the NFE of trees and of shared prefixes counted at the
transformer, exact re-scoring of stored transitions, and an all-ODE plan against a plain Euler loop.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowrl.flow.plan import build_plan, eval_plan, granular_sigmas, plan_generator
from flowrl.flow.sampler import Rollout, sample, tail_sigmas
from flowrl.flow.steps import compressed_sigmas, sde_step
from plans import plan_config
from toy_policies import GaussianPolicy

H = W = 32
PROMPTS = ["a red cube", "two green dogs on a hill"]
MSL = 8


# ---------------------------------------------------------------------------------------------
# an analytic policy with the sampler's protocol
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# fixtures: tiny real pipelines, with a counter of transformer rows
# ---------------------------------------------------------------------------------------------


class _RowCounter:
    def __init__(self, transformer):
        self.rows: list[int] = []
        transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        self.rows.append(int(x.shape[0]))

    def reset(self):
        self.rows.clear()


@pytest.fixture(scope="module")
def sd3():
    from flowrl.flow.policy import FlowPolicy
    from flowrl.demo.tiny_image import build_tiny_sd3_pipeline

    pol = FlowPolicy.from_pipeline(build_tiny_sd3_pipeline(seed=0), max_sequence_length=MSL)
    pol.counter = _RowCounter(pol.transformer)
    return pol


@pytest.fixture(scope="module")
def flux():
    from flowrl.flow.policy import FlowPolicy
    from flowrl.demo.tiny_image import build_tiny_flux_pipeline

    pol = FlowPolicy.from_pipeline(build_tiny_flux_pipeline(seed=0), max_sequence_length=MSL)
    pol.counter = _RowCounter(pol.transformer)
    return pol


@pytest.fixture(params=["toy", "sd3", "flux"])
def policy(request):
    if request.param == "toy":
        return GaussianPolicy()
    return request.getfixturevalue(request.param)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _run(policy, plan, *, group_size=4, seed=0, guidance_scale=4.5, **kw) -> Rollout:
    return sample(policy, PROMPTS, plan, group_size=group_size, height=H, width=W,
                  guidance_scale=guidance_scale, generator=_gen(seed), **kw)


def _transformer_rows(policy) -> list[int]:
    """Rows per denoiser evaluation: the transformer's batch (halved for SD3's CFG batch)."""
    if isinstance(policy, GaussianPolicy):
        return list(policy.calls)
    return list(policy.counter.rows)


def _reset(policy):
    if isinstance(policy, GaussianPolicy):
        policy.calls.clear()
    else:
        policy.counter.reset()


KIND_CONFIGS = {
    "full": dict(kind="full"),
    "random_subset": dict(kind="random_subset", sde="dance_sde", noise_level=0.3),
    "window": dict(kind="window", window=dict(size=2, start=1)),
    "window_flash": dict(kind="window", window=dict(size=2), ode_solver="dpm2m", tail=dict(ratio=0.4)),
    "random_window": dict(kind="random_window", window=dict(size=2), sde="cps", noise_level=0.8),
    "singular": dict(kind="singular", granularities=[1, 2]),
    "tree": dict(kind="tree", tree=dict(branch_factors=[2, 2], branch_noise=[0.9, 0.6])),
    "heun": dict(kind="window", window=dict(size=1, start=2), ode_solver="heun"),
}


def _tensors(r: Rollout) -> dict[str, torch.Tensor]:
    out = {}
    for name in Rollout._ROW_FIELDS + ("step_index", "node_parent", "node_step", "node_prompt"):
        v = getattr(r, name)
        if v is not None:
            out[name] = v
    return out


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KIND_CONFIGS))
def test_every_plan_kind_end_to_end_and_deterministic(policy, name):
    S, G = 6, 4
    cfg = plan_config(**KIND_CONFIGS[name])
    plan = build_plan(cfg, S, 3, plan_generator(0, 3))
    same_noise = name in ("singular",)
    r = _run(policy, plan, group_size=G, same_noise=same_noise)
    N = len(PROMPTS) * G
    T = plan.last_sde - plan.first_sde + 1
    assert r.num_samples == N and r.num_stored_steps == T
    assert r.latents.shape[:2] == (N, T + 1) and r.means.shape[:2] == (N, T)
    assert r.step_index.tolist() == list(range(plan.first_sde, plan.last_sde + 1))
    assert torch.equal(r.stochastic, plan.sde[r.step_index].expand(N, T))
    assert bool((r.trained <= r.stochastic).all()) and bool(r.trained.any())
    assert torch.isfinite(r.log_probs).all()
    assert (r.log_probs[~r.stochastic] == 0).all() and (r.log_probs[r.stochastic] != 0).all()
    assert (r.stds[r.stochastic] > 0).all() and (r.stds[~r.stochastic] == 0).all()
    assert torch.equal(r.sigmas[0], policy.sigmas(S, H, W)[r.step_index])
    assert torch.equal(r.noise_levels[0], plan.noise_level[r.step_index])
    assert r.images.shape == (N, 3, H, W) and r.images.min() >= 0 and r.images.max() <= 1
    assert r.images_per_granularity.shape == (N, len(plan.granularities), 3, H, W)
    assert r.prompt_index.tolist() == [p for p in range(len(PROMPTS)) for _ in range(G)]
    assert r.sde_kind == plan.sde_kind and r.guidance_scale == 4.5
    # samples of a group differ (their noise differs somewhere)
    assert not torch.equal(r.final_latents[0], r.final_latents[1])

    # exact: the same call repeated in this process (same shapes, same ops)
    again = _run(policy, plan, group_size=G, same_noise=same_noise)
    a, b = _tensors(r), _tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "not deterministic"
    other = _run(policy, plan, group_size=G, same_noise=same_noise, seed=1)
    assert not torch.equal(other.final_latents, r.final_latents)


@pytest.mark.parametrize("same_noise", [False, True])
def test_all_ode_plan_equals_plain_euler_loop(policy, same_noise):
    S, G = 5, 3
    r = _run(policy, eval_plan(S), group_size=G, same_noise=same_noise, guidance_scale=3.0)
    P = len(PROMPTS)
    rows = P if same_noise else P * G
    x = policy.initial_noise(rows, H, W, _gen(0)).float()
    emb = policy.encode_prompts(PROMPTS).select(torch.arange(P).repeat_interleave(rows // P))
    sig = policy.sigmas(S, H, W)
    for i in range(S):
        v = policy.velocity(x, sig[i].expand(rows).contiguous(), emb, 3.0)
        x = x + v * (sig[i + 1] - sig[i])
    expected = x.repeat_interleave(P * G // rows, dim=0)
    # exact: this loop makes the sampler's velocity calls (same rows, same inputs) and its float32 Euler update
    assert torch.equal(r.final_latents[:, 0], expected)
    assert r.trained.shape == (P * G, 0) and r.num_stored_steps == 0
    assert r.nfe == rows * S  # with same_noise the whole trajectory is computed once per prompt


# ---------------------------------------------------------------------------------------------
# NFE: trees and shared prefixes, counted at the transformer
# ---------------------------------------------------------------------------------------------


def _tree_rows_formula(plan, P, n_trees, same_noise):
    """Rows evaluated at each head step: P·trees·(product of branch factors of earlier steps)."""
    rows, out = P * (1 if same_noise else n_trees), []
    first = plan.first_sde
    for i in range(plan.last_sde + 1):
        out.append(rows)
        if plan.sde[i]:
            rows *= int(plan.branch[i]) * (n_trees if (same_noise and i == first) else 1)
    return out, rows


@pytest.mark.parametrize("n_trees,same_noise", [(1, False), (2, False), (2, True)])
def test_tree_nfe_is_the_node_count(policy, n_trees, same_noise):
    S = 6
    plan = build_plan(plan_config(kind="tree", tree=dict(branch_factors=[3, 2], branch_steps=[1, 3])), S, 0)
    G = plan.leaves * n_trees
    P, N = len(PROMPTS), len(PROMPTS) * G
    cfg_scale = 4.5
    _reset(policy)
    r = _run(policy, plan, group_size=G, same_noise=same_noise, guidance_scale=cfg_scale)
    head_rows, leaves_rows = _tree_rows_formula(plan, P, n_trees, same_noise)
    assert leaves_rows == N
    tail_steps = S - (plan.last_sde + 1)
    expected = sum(head_rows) + tail_steps * N
    rows = _transformer_rows(policy)
    cfg_factor = 2 if getattr(policy, "pipeline", None) is not None and type(policy).__name__ == "SD3Policy" else 1
    assert sum(rows) // cfg_factor == expected == r.nfe
    assert len(rows) == r.velocity_calls == S
    assert r.nfe < N * S  # cheaper than leaves × steps
    # the node structure: roots + the children created at each depth
    roots = P * (1 if same_noise else n_trees)
    assert r.node_parent.numel() == roots + P * n_trees * 3 + N
    assert (r.node_parent[:roots] == -1).all()


def test_tree_structure_and_dedup():
    pol = GaussianPolicy()
    plan = build_plan(plan_config(kind="tree", tree=dict(branch_factors=[3, 2], branch_steps=[1, 3])), 6, 0)
    r = _run(pol, plan, group_size=12, same_noise=False)  # two trees per prompt
    N, P = 24, 2
    path = r.leaf_path
    assert path.shape == (N, 2)
    for n in range(N):
        root = r.node_parent[path[n, 0]]
        assert r.node_parent[root] == -1 and r.node_prompt[root] == r.prompt_index[n]
        assert r.node_parent[path[n, 1]] == path[n, 0]
        assert r.node_step[path[n, 0]] == 1 and r.node_step[path[n, 1]] == 3
    # each node has branch-factor many children
    for d, b in ((0, 3), (1, 2)):
        parents = r.node_parent[path[:, d].unique()]
        assert (torch.bincount(parents)[parents.unique()] == b).all()
    # step_node: the node created by each stored transition (−1 on ODE steps)
    t1, t3 = (r.step_index == 1).nonzero().item(), (r.step_index == 3).nonzero().item()
    assert torch.equal(r.step_node[:, t1], path[:, 0]) and torch.equal(r.step_node[:, t3], path[:, 1])
    assert (r.step_node[:, (r.step_index == 2).nonzero().item()] == -1).all()
    # leaves under one depth-1 node share its state; different nodes differ
    after = r.latents[:, t1 + 1]
    for node in path[:, 0].unique():
        rows = (path[:, 0] == node).nonzero().flatten()
        assert all(torch.equal(after[rows[0]], after[k]) for k in rows)
    assert not torch.equal(after[0], after[2])
    # dedup: every distinct stochastic transition is trained exactly once
    for t, d in ((t1, 0), (t3, 1)):
        trained_nodes = path[r.trained[:, t], d]
        assert sorted(trained_nodes.tolist()) == sorted(path[:, d].unique().tolist())
    no_dedup = build_plan(plan_config(kind="tree", tree=dict(branch_factors=[3, 2], branch_steps=[1, 3], dedup=False)), 6, 0)
    r2 = _run(pol, no_dedup, group_size=12)
    assert r2.trained[:, [t1, t3]].all()
    with pytest.raises(ValueError, match="group_size"):
        _run(pol, plan, group_size=8)  # not a multiple of the 6 leaves


@pytest.mark.parametrize("same_noise", [True, False])
def test_prefix_shared_once_per_prompt(policy, same_noise):
    S, G, k = 6, 4, 3
    plan = build_plan(plan_config(kind="window", window=dict(size=2, start=k, stride=0)), S, 0)
    assert plan.first_sde == k
    P, N = len(PROMPTS), len(PROMPTS) * G
    _reset(policy)
    r = _run(policy, plan, group_size=G, same_noise=same_noise, guidance_scale=1.0)
    rows = _transformer_rows(policy)
    prefix_rows = P if same_noise else N
    # steps 0..k-1 (prefix) and step k (velocity at the branch point, reused by all children)
    assert rows[: k + 1] == [prefix_rows] * (k + 1)
    assert rows[k + 1:] == [N] * (S - k - 1)
    assert r.nfe == sum(rows)
    # the shared prefix is the plain ODE from the prompt's one initial noise
    x = policy.initial_noise(prefix_rows, H, W, _gen(0)).float()
    emb = policy.encode_prompts(PROMPTS).select(torch.arange(P).repeat_interleave(prefix_rows // P))
    sig = policy.sigmas(S, H, W)
    for i in range(k):
        x = x + policy.velocity(x, sig[i].expand(prefix_rows).contiguous(), emb, 1.0) * (sig[i + 1] - sig[i])
    # exact: the same velocity calls on the same rows as the sampler's prefix, then a copy per member
    assert torch.equal(r.latents[:, 0], x.repeat_interleave(N // prefix_rows, dim=0))
    if same_noise:  # members share the prefix but part at the first SDE step
        assert not torch.equal(r.latents[0, 1], r.latents[1, 1])


# ---------------------------------------------------------------------------------------------
# stored transitions re-score exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["full", "window", "random_window", "random_subset"])
def test_stored_transitions_rescore_exactly(policy, name, store_dtype):
    plan = build_plan(plan_config(**KIND_CONFIGS[name]), 5, 1, plan_generator(0, 1))
    r = _run(policy, plan, group_size=3, store_dtype=store_dtype, guidance_scale=4.5)
    assert r.latents.dtype == store_dtype and r.means.dtype == store_dtype
    N = r.num_samples
    emb = policy.encode_prompts(PROMPTS).select(r.prompt_index)
    emb_tensors = r.embeds_for()
    assert all(torch.equal(emb_tensors[k], v) for k, v in emb.tensors().items())
    for t in range(r.num_stored_steps):
        x = r.latents[:, t].float()
        v = policy.velocity(x, r.sigmas[:, t], emb, r.guidance_scale)
        out = sde_step(x, v, r.sigmas[:, t], r.sigma_next[:, t], r.noise_levels[:, t],
                       prev_sample=r.latents[:, t + 1].float(), kind=r.sde_kind, reduction=r.reduction)
        if bool(r.stochastic[0, t]):
            # exact (our promise): no branching here, so the learner's batch is the sampler's (all N rows)
            assert torch.equal(out.log_prob, r.log_probs[:, t]), f"step {t}: on-policy ratio is not exactly 1"
            assert torch.equal(out.mean.to(store_dtype), r.means[:, t])
            assert torch.equal(out.std.reshape(-1).expand(N), r.stds[:, t])


@pytest.mark.parametrize("kind", ["tree", "singular"])
def test_shared_node_transitions_rescore(policy, kind):
    """At a branch point the sampler evaluates the velocity once per node (a smaller batch than the
    N rows a learner recomputes). The analytic policy is batch invariant, so re-scoring is exact; a
    real transformer on CPU may differ in the last float bit between batch sizes, so there the
    re-scored log-prob must agree to float32 precision (far below any clip range, ~1e-4)."""
    plan = build_plan(plan_config(kind="tree", tree=dict(branch_factors=[3, 2], branch_steps=[1, 3])) if kind == "tree"
                      else plan_config(kind="singular", singular=dict(steps=[2])), 6, 0)
    r = _run(policy, plan, group_size=6, same_noise=kind == "singular")
    emb = policy.encode_prompts(PROMPTS).select(r.prompt_index)
    for t in (r.stochastic[0]).nonzero().flatten().tolist():
        x = r.latents[:, t].float()
        v = policy.velocity(x, r.sigmas[:, t], emb, r.guidance_scale)
        out = sde_step(x, v, r.sigmas[:, t], r.sigma_next[:, t], r.noise_levels[:, t],
                       prev_sample=r.latents[:, t + 1].float(), kind=r.sde_kind, reduction=r.reduction)
        if isinstance(policy, GaussianPolicy):
            assert torch.equal(out.log_prob, r.log_probs[:, t])
        else:
            # float32, |log_prob| ~ 1 (mean reduction): other batch sizes differ by ~1 ulp (1e-7, measured);
            # 1e-5 leaves two orders of margin, far below what a wrong velocity, sigma or row would move
            torch.testing.assert_close(out.log_prob, r.log_probs[:, t], rtol=0, atol=1e-5)


def test_rescoring_without_the_store_round_trip_would_differ():
    """The bf16 round trip matters: scoring the unrounded sample gives a different log-prob."""
    pol = GaussianPolicy()
    plan = build_plan(plan_config(kind="full"), 4, 0)
    r32 = _run(pol, plan, group_size=2, store_dtype=torch.float32)
    r16 = _run(pol, plan, group_size=2, store_dtype=torch.bfloat16)
    assert not torch.equal(r32.log_probs[:, 0], r16.log_probs[:, 0])
    assert torch.allclose(r32.log_probs[:, 0], r16.log_probs[:, 0], atol=0.05)


# ---------------------------------------------------------------------------------------------
# granularities, solvers, per-sample subsets
# ---------------------------------------------------------------------------------------------


def test_multi_granularity_continuations():
    pol = GaussianPolicy()
    S = 9
    cfg = dict(kind="singular", singular=dict(steps=[2]), granularities=[1, 2, 3])
    plan = build_plan(plan_config(**cfg), S, 0)
    pol.calls.clear()
    r = _run(pol, plan, group_size=4, same_noise=True)
    N = r.num_samples
    assert r.final_latents.shape[:2] == (N, 3) and r.images_per_granularity.shape[:2] == (N, 3)
    assert torch.equal(r.images, r.images_per_granularity[:, 0])
    sig = pol.sigmas(S, H, W)
    tails = [granular_sigmas(sig[3:], g).numel() - 1 for g in (1, 2, 3)]
    # 1 fine step, then every g-th sigma; the last kept sigma is replaced by 0 (G2RPO decodes the x0
    # prediction at the point before it: sigmas 3,4,6,8 -> 3,4,6,0 for g=2; 3,4,7 -> 3,4,0 for g=3)
    assert tails == [6, 3, 2]
    assert r.nfe == 2 * 3 + N * sum(tails)  # prefix and branch step once per prompt
    single = _run(pol, build_plan(plan_config(**{**cfg, "granularities": [1]}), S, 0), group_size=4, same_noise=True)
    # exact: the granularity-1 continuation is the same computation with or without the coarser ones
    assert torch.equal(single.final_latents[:, 0], r.final_latents[:, 0])
    assert not torch.equal(r.final_latents[:, 0], r.final_latents[:, 1])
    # coarser continuations land near the fine one (same ODE, larger steps; g=3 jumps from sigma[4] to 0)
    dev = [float((r.final_latents[:, k] - r.final_latents[:, 0]).abs().max()) for k in (1, 2)]
    assert 0 < dev[0] < dev[1] < 1.5, dev


def test_compressed_tail_and_heun_nfe():
    pol = GaussianPolicy()
    S, N, P = 10, 4, 2
    flash = build_plan(plan_config(kind="window", window=dict(size=3), ode_solver="dpm2m", tail=dict(ratio=0.4)), S, 0)
    r = _run(pol, flash, group_size=2)
    tail = tail_sigmas(flash, pol.sigmas(S, H, W), 3, 1)
    assert torch.equal(tail, compressed_sigmas(pol.sigmas(S, H, W)[3:], 0.4, shift=3.0))
    assert tail.numel() - 1 == int(7 * 0.4)  # 7 remaining steps -> 2
    assert r.nfe == N * (3 + 2)
    heun = build_plan(plan_config(kind="window", window=dict(size=1, start=4, stride=0), ode_solver="heun"), S, 0)
    r = _run(pol, heun, group_size=2)
    # 4 prefix Heun steps (2 NFE), 1 SDE step, 5 tail steps of which the last (to 0) is Euler
    assert r.nfe == N * (4 * 2 + 1 + 4 * 2 + 1)


def test_second_order_solvers_are_more_accurate_on_the_gaussian_flow():
    """The Gaussian ODE maps eps to mu + s0·eps exactly. On a uniform schedule (shift 1) Euler's
    error halves per doubling of steps (1st order), Heun's falls ~4x (2nd order), and at equal NFE
    Heun and DPM-Solver++(2M) are far more accurate than Euler."""
    pol = GaussianPolicy(s0=1.0, shift=1.0)
    eps = pol.initial_noise(4, H, W, _gen(0))
    exact = pol.encode_prompts(PROMPTS).mu.repeat_interleave(2).reshape(-1, 1, 1, 1) + 1.0 * eps

    def err(solver, steps):
        r = _run(pol, eval_plan(steps, ode_solver=solver), group_size=2)
        return (r.final_latents[:, 0] - exact).abs().max().item(), r.nfe // 4

    (e8, _), (e16, n16), (e32, n32) = err("euler", 8), err("euler", 16), err("euler", 32)
    (h8, _), (h16, nh16) = err("heun", 8), err("heun", 16)
    (d16, nd16) = err("dpm2m", 16)
    assert 1.6 < e8 / e16 < 2.4 and 1.6 < e16 / e32 < 2.4  # first order
    assert h8 / h16 > 3.5  # second order
    assert nh16 == 31 <= n32 and h16 < e32 / 10  # Heun: 2 NFE per step, the last step (to 0) Euler
    assert nd16 == n16 and d16 < e16 / 10


def test_per_sample_trained_subsets():
    pol = GaussianPolicy()
    plan = build_plan(plan_config(kind="random_subset", subset=dict(fraction=0.5), sde="dance_sde", noise_level=0.3), 9, 0)
    r = _run(pol, plan, group_size=4)
    assert (r.trained.sum(1) == 4).all()  # int(8 * 0.5)
    assert not r.trained[:, -1].any()
    assert len({tuple(row.tolist()) for row in r.trained}) > 1
    assert r.stochastic.all()


# ---------------------------------------------------------------------------------------------
# Rollout helpers and errors
# ---------------------------------------------------------------------------------------------


def test_rollout_select_and_to():
    pol = GaussianPolicy()
    r = _run(pol, build_plan(plan_config(kind="tree", tree=dict(branch_factors=[2])), 4, 0), group_size=2)
    sub = r.select([3, 0])
    assert sub.num_samples == 2 and torch.equal(sub.latents[0], r.latents[3])
    assert torch.equal(sub.leaf_path, r.leaf_path[[3, 0]]) and torch.equal(sub.node_parent, r.node_parent)
    assert torch.equal(sub.embeds_for()["mu"], r.embeds["mu"][r.prompt_index[[3, 0]]])
    moved = r.to("cpu")
    assert torch.equal(moved.log_probs, r.log_probs) and moved.nfe == r.nfe


def test_bad_arguments_name_the_argument():
    pol = GaussianPolicy()
    plan = build_plan(plan_config(kind="full"), 3, 0)
    for kwargs, name in (
        (dict(prompts=[]), "prompts"),
        (dict(prompts="a cat"), "prompts"),
        (dict(group_size=0), "group_size"),
        (dict(store_dtype=torch.int32), "store_dtype"),
        (dict(chunk_size=0), "chunk_size"),
    ):
        args = dict(prompts=PROMPTS, group_size=2, height=H, width=W, guidance_scale=1.0, generator=_gen())
        args.update(kwargs)
        prompts = args.pop("prompts")
        with pytest.raises(ValueError, match=name):
            sample(pol, prompts, plan, **args)
    branching = dataclasses.replace(build_plan(plan_config(kind="window", window=dict(size=2)), 5, 0),
                                    branch=torch.tensor([2, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="plan: branching"):
        _run(pol, branching, group_size=2)


def test_chunked_velocity_gives_the_same_rollout():
    pol = GaussianPolicy()
    plan = build_plan(plan_config(kind="window", window=dict(size=2)), 5, 0)
    a = _run(pol, plan, group_size=3)
    pol.calls.clear()
    b = _run(pol, plan, group_size=3, chunk_size=4)
    assert max(pol.calls) <= 4 and b.velocity_calls > a.velocity_calls and b.nfe == a.nfe
    # exact only because the analytic velocity is elementwise +-*/ (correctly rounded, batch invariant on any
    # CPU); with a transformer, chunks are other GEMMs and would need a tolerance (tests/test_evaluate.py)
    assert all(torch.equal(x, y) for x, y in zip(_tensors(a).values(), _tensors(b).values()))


@pytest.mark.parametrize("kind", ["full", "tree", "random_subset"])
@pytest.mark.parametrize("same_noise", [False, True])
def test_per_prompt_generators_make_a_prompt_independent_of_the_batch(kind, same_noise):
    """With one generator per prompt, a prompt's samples are the same whether it is sampled
    alone or beside other prompts (what makes data-parallel runs equal single-process runs)."""
    pol = GaussianPolicy()
    plan = build_plan(plan_config(kind=kind, window=dict(size=2)), 6, 0, _gen(1))
    both = sample(pol, ["ab", "abcd"], plan, group_size=4, height=H, width=W, guidance_scale=1.0,
                  generator=[_gen(10), _gen(20)], same_noise=same_noise)
    alone = sample(pol, ["abcd"], plan, group_size=4, height=H, width=W, guidance_scale=1.0,
                   generator=[_gen(20)], same_noise=same_noise)
    # exact: same noise draws, and the analytic velocity is elementwise (batch invariant by construction)
    assert torch.equal(both.latents[4:], alone.latents)
    assert torch.equal(both.log_probs[4:], alone.log_probs)
    assert torch.equal(both.trained[4:], alone.trained)
    assert not torch.equal(both.latents[:4], both.latents[4:])
    with pytest.raises(ValueError, match="one generator per prompt"):
        sample(pol, ["ab", "abcd"], plan, group_size=4, height=H, width=W, guidance_scale=1.0, generator=[_gen(1)])
