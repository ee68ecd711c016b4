"""Run a sampling :class:`~flowrl.flow.plan.Plan` with a flow policy and return a :class:`Rollout`.

The sampler needs only this protocol from ``policy`` (:class:`flowrl.flow.policy.FlowPolicy`
implements it):

* ``encode_prompts(prompts, negative_prompt="") -> embeds`` with ``embeds.select(index)``
  (rows by index) and ``embeds.tensors() -> dict[str, Tensor]``;
* ``latent_shape(height, width)``, ``initial_noise(batch, height, width, generator)``,
  ``sigmas(num_steps, height, width)`` (``num_steps + 1`` sigmas ending with 0);
* ``velocity(x, sigma, embeds, guidance_scale)`` (``sigma`` a ``[B]`` tensor);
* ``decode(x) -> [B, 3, H, W]`` in [0, 1].

How a rollout is computed
-------------------------
All samples of all prompts advance together, one step at a time, as one batch of *rows*; a row is
a distinct state. Rows multiply only at stochastic steps:

* independent samples (default): ``P × G`` rows from the start, each with its own initial noise;
* ``same_noise=True`` (Flow-GRPO ``same_latent``, DanceGRPO/MixGRPO/G²RPO ``init_same_noise``):
  one row per prompt until the first SDE step, where each row becomes ``G`` children. The ODE
  prefix is thus computed once per prompt (Flow-GRPO-Fast recomputes it for every member);
* trees (``plan.kind == "tree"``): one row per tree until the first branching step; at a step with
  branch factor b each row becomes b children. The velocity of a node is computed once and reused
  by all its children (G²RPO's trick); each child draws its own noise. ``group_size`` is the number
  of leaves per prompt: a multiple of ``plan.leaves`` (``group_size // plan.leaves`` trees, each with
  its own initial noise; with ``same_noise`` they share it, so the trees' first-level children are
  all siblings).

Rows are kept in *leaf order* (prompt-major, then tree, then child index at each depth), so the
final row ``n`` descends from row ``n // (N // r)`` of any earlier step that had ``r`` rows.

NFE. ``Rollout.nfe`` counts velocity evaluations per row: one batched call on ``r`` rows adds ``r``;
classifier-free guidance (two branches inside one ``policy.velocity`` call) counts once. For a tree
this is the number of distinct nodes evaluated (summed over steps), not leaves × steps.
``Rollout.velocity_calls`` counts the calls themselves (chunks included).

Storage. Only the contiguous span from the first to the last SDE step is stored: ``T`` transitions
(``step_index``), with ``latents[:, t]`` the state entering step ``step_index[t]`` and
``latents[:, t + 1]`` the state it produced (``latents[:, T]``: the state after the last SDE step).
Every state in the span is rounded through ``store_dtype`` *before* it is used, and each sampled
``x'`` is rounded before it is scored (``sde_step(..., prev_sample=x'.to(store_dtype).float())``), so
recomputing a transition from the stored tensors scores exactly what was stored (on-policy ratio
exactly 1 when the recomputed velocity is bitwise the same).

Sweeps (``plan.sweep``: a singular plan with ``singular.choice="all"``; G²RPO's ``eta_step_list``
loop, TempFlow-GRPO's per-step branches). Every eligible step k branches in the same rollout from
one deterministic trunk per prompt: the prompt's one initial noise (``same_noise`` is required) is
integrated by the ODE to x_k, ``G`` rows take ONE stochastic step at k (their own noise, independent
across k), then continue deterministically to the end (every granularity). It is run as K singular
samplings (:meth:`~flowrl.flow.plan.Plan.singular_at`) that share the prompt embeddings and the
initial noise; the SDE noise of branch k comes from a generator seeded by a draw from the caller's
generator (per prompt for a list), so it differs between k's and a prompt's rows still depend on
its own generator only. Rows are prompt-major, then branch step (in step order), then member:
row ``(p, j, g)`` is ``p·K·G + j·G + g``; ``group_id = p·K + j`` (one advantage group per prompt and
branch step), ``groups_per_prompt = K``, ``branch_step`` the row's k. Every row stores ONE
transition (T = 1, its own ``sigmas``/``sigma_next``), and ``step_index`` is ``[-1]`` (the step
differs between rows; read ``branch_step``).

The ODE tail after the last SDE step is run once per continuation granularity (G²RPO) or on the
compressed sigmas (MixGRPO-Flash), with the plan's ODE solver; deterministic steps before the first
SDE step use ``plan.head_solver`` (default: the same solver). A multistep solver's history (the last
x0 prediction) is updated at every step, stochastic ones included, and carried into the tail, as
MixGRPO-Flash does: the first tail step after the window is already second order.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from flowrl.flow.plan import Plan, granular_sigmas
from flowrl.flow.steps import (
    compressed_sigmas,
    dpm_solver_2m_step,
    heun_step,
    ode_step,
    sde_step,
    x0_from_velocity,
)

logger = logging.getLogger(__name__)

__all__ = ["Rollout", "sample", "tail_sigmas"]


# --------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout of ``P`` prompts × ``G`` samples (``N = P·G`` rows, prompt-major), plain tensors.

    Per stored transition t (``T`` of them; see the module doc for which steps are stored):
    ``latents[:, t]`` → ``latents[:, t + 1]`` from ``sigmas[:, t]`` to ``sigma_next[:, t]`` with
    noise level ``noise_levels[:, t]`` and dynamics ``sde_kind``; ``log_probs[:, t]`` is its old
    log-prob (``reduction`` over latent elements; 0 on ODE steps), ``means[:, t]`` the old mean
    (for GRPO-Guard's ratio normalisation and the KL) and ``stds[:, t]`` its std s (0 on ODE steps).
    ``trained[:, t]`` marks the transitions to train (a subset of ``stochastic``).

    Recomputing transition (n, t) with grad needs: ``x = latents[n, t]``, ``x' = latents[n, t+1]``,
    ``sigmas``/``sigma_next``/``noise_levels`` ``[n, t]``, ``sde_kind``, ``reduction``,
    ``guidance_scale`` and the prompt embeddings ``embeds_for(rows)``; then
    ``sde_step(x.float(), v, sigma, sigma_next, noise_level, prev_sample=x'.float(), kind=sde_kind,
    reduction=reduction)``.

    Sweeps (``branch_step`` is not None): ``N = P·K·G`` rows, each with the one transition
    (T = 1) taken at its ``branch_step``; ``group_id = prompt_index·K + j`` for the j-th branch step
    and ``groups_per_prompt = K`` (see the module doc).

    Trees (``node_parent`` is not None): nodes are the distinct states created at stochastic steps
    plus one root per tree (parent −1, step −1). ``node_step[m]`` is the step whose transition
    created node m, ``node_prompt[m]`` its prompt; ``leaf_path[n, d]`` is the node of leaf n at depth
    d (d over the ``depth`` stochastic steps); ``step_node[n, t]`` the node produced by stored
    transition t (−1 on ODE steps). A node's value is the mean reward of the leaves under it; its
    advantage is taken against its siblings (same parent). With ``tree_dedup`` a transition shared
    by several leaves is ``trained`` only on its first leaf.
    """

    latents: Tensor  # [N, T+1, *latent_shape] in store_dtype
    means: Optional[Tensor]  # [N, T, *latent_shape] in store_dtype (None if store_means=False)
    log_probs: Tensor  # [N, T] float32
    stds: Tensor  # [N, T] float32
    sigmas: Tensor  # [N, T] float32
    sigma_next: Tensor  # [N, T] float32
    noise_levels: Tensor  # [N, T] float32
    stochastic: Tensor  # [N, T] bool
    trained: Tensor  # [N, T] bool
    step_index: Tensor  # [T] int64: the global step of each stored transition ([-1] for a sweep: see branch_step)
    final_latents: Tensor  # [N, n_granularities, *latent_shape] in store_dtype
    prompt_index: Tensor  # [N] int64: row of ``prompts`` / ``embeds``
    group_id: Tensor  # [N] int64: advantage group, prompt_index * groups_per_prompt + branch (= prompt_index but for sweeps)
    embeds: dict[str, Tensor]  # PromptEmbeds.tensors() of the P prompts (one row per prompt)
    prompts: list[str]  # the P prompts (per prompt, not per sample)
    images: Optional[Tensor]  # [N, 3, H, W] float32 in [0, 1] (first granularity), None if decode=False
    images_per_granularity: Optional[Tensor]  # [N, n_granularities, 3, H, W]
    granularities: tuple[int, ...]
    node_parent: Optional[Tensor] = None  # [M] int64, trees only
    node_step: Optional[Tensor] = None  # [M] int64
    node_prompt: Optional[Tensor] = None  # [M] int64
    leaf_path: Optional[Tensor] = None  # [N, depth] int64
    step_node: Optional[Tensor] = None  # [N, T] int64
    branch_step: Optional[Tensor] = None  # [N] int64, sweeps only: the step k at which the row branched off the trunk
    groups_per_prompt: int = 1  # advantage groups per prompt (K branch steps for a sweep)
    nfe: int = 0
    velocity_calls: int = 0
    sde_kind: str = "flow_sde"
    reduction: str = "mean"
    guidance_scale: float = 1.0
    num_steps: int = 0
    height: int = 0
    width: int = 0
    plan_kind: str = ""

    # per-row fields (first dim N); everything else is per prompt, per node, or scalar
    _ROW_FIELDS = (
        "latents", "means", "log_probs", "stds", "sigmas", "sigma_next", "noise_levels", "stochastic",
        "trained", "final_latents", "prompt_index", "group_id", "images", "images_per_granularity",
        "leaf_path", "step_node", "branch_step",
    )

    @property
    def num_samples(self) -> int:
        return int(self.prompt_index.shape[0])

    @property
    def num_stored_steps(self) -> int:
        return int(self.step_index.shape[0])

    @property
    def nfe_per_sample(self) -> float:
        return self.nfe / max(1, self.num_samples)

    def select(self, rows: Tensor | Sequence[int]) -> "Rollout":
        """The rollout restricted to ``rows`` (per-row tensors indexed; per-prompt and per-node
        tensors kept whole, so ``prompt_index`` and ``leaf_path`` stay valid)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        changes = {}
        for name in self._ROW_FIELDS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[idx.to(value.device)]
        return replace(self, **changes)

    def to(self, device: Any) -> "Rollout":
        """Move every tensor to ``device``."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.to(device)
        changes["embeds"] = {k: v.to(device) for k, v in self.embeds.items()}
        return replace(self, **changes)

    def embeds_for(self, rows: Tensor | Sequence[int] | None = None) -> dict[str, Tensor]:
        """Prompt-embedding tensors with one row per sample in ``rows`` (all rows if None);
        rebuild with ``PromptEmbeds.from_tensors``."""
        pidx = self.prompt_index if rows is None else self.prompt_index[torch.as_tensor(rows, dtype=torch.long)]
        return {k: v[pidx.to(v.device)] for k, v in self.embeds.items()}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


class _Velocity:
    """``policy.velocity`` on the current rows, in chunks, counting NFE per row."""

    def __init__(self, policy: Any, embeds: Any, guidance_scale: float, chunk_size: Optional[int]):
        self.policy = policy
        self.embeds = embeds
        self.guidance_scale = guidance_scale
        self.chunk_size = chunk_size
        self.nfe = 0
        self.calls = 0
        self._chunks: list[tuple[int, int, Any]] = []

    def set_rows(self, row_prompt: Tensor) -> None:
        rows = int(row_prompt.shape[0])
        size = rows if not self.chunk_size else min(self.chunk_size, rows)
        self._chunks = []
        for a in range(0, rows, size):
            b = min(rows, a + size)
            self._chunks.append((a, b, self.embeds.select(row_prompt[a:b])))

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        outs = []
        for a, b, emb in self._chunks:
            outs.append(self.policy.velocity(x[a:b], sigma[a:b], emb, self.guidance_scale))
            self.calls += 1
            self.nfe += b - a
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _round(x: Tensor, store_dtype: torch.dtype) -> Tensor:
    """``x.to(store_dtype).float()`` (a no-op for float32)."""
    if store_dtype == torch.float32 and x.dtype == torch.float32:
        return x
    return x.to(store_dtype).to(torch.float32)


def _full(rows: int, value: Tensor, device: torch.device) -> Tensor:
    return value.to(device=device, dtype=torch.float32).reshape(1).expand(rows).contiguous()


def _std_rows(std: Tensor, rows: int) -> Tensor:
    return std.reshape(-1).expand(rows).to(torch.float32) if std.numel() == 1 else std.reshape(rows).float()


def _expand_rows(t: Tensor, n: int) -> Tensor:
    """Rows of an earlier step to the N final rows (leaf order: row n descends from n // (N // r))."""
    r = t.shape[0]
    if r == n:
        return t
    return t.repeat_interleave(n // r, dim=0)


def tail_sigmas(plan: Plan, sigmas: Tensor, start: int, granularity: int) -> Tensor:
    """Sigmas of the deterministic tail that starts at step ``start`` (after the last SDE step),
    for one continuation ``granularity``, or compressed (MixGRPO-Flash) when the plan says so."""
    tail = sigmas[start:]
    if tail.numel() < 2:
        return tail
    if plan.compress_ratio is not None:
        return compressed_sigmas(tail, plan.compress_ratio, shift=plan.compress_shift)
    return granular_sigmas(tail, granularity)


class _Deterministic:
    """The plan's ODE solvers, with the multistep history (the last x0 prediction and its sigma)
    that every step updates, deterministic or not (MixGRPO-Flash's DPM-Solver++ state)."""

    def __init__(self, solver: str, velocity: _Velocity):
        self.solver = solver
        self.velocity = velocity
        self.reset()

    def reset(self) -> None:
        self.x0_prev: Optional[Tensor] = None
        self.sigma_prev: Optional[Tensor] = None

    def observe(self, x: Tensor, v: Tensor, sigma: Tensor) -> None:
        """Record the x0 prediction of a step taken by another rule (an SDE or head step)."""
        if self.solver == "dpm2m":
            self.x0_prev, self.sigma_prev = x0_from_velocity(x, v, sigma), sigma

    def expand(self, idx: Tensor) -> None:
        """Follow rows that branch (``x[idx]``)."""
        if self.x0_prev is not None:
            self.x0_prev, self.sigma_prev = self.x0_prev[idx], self.sigma_prev[idx]

    def step(self, x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, solver: Optional[str] = None) -> Tensor:
        solver = solver or self.solver
        if solver == "euler":
            out = ode_step(x, v, sigma, sigma_next)
        elif solver == "heun":
            out = heun_step(x, v, sigma, sigma_next, self.velocity)
        elif solver == "dpm2m":
            x0 = x0_from_velocity(x, v, sigma)
            out = dpm_solver_2m_step(x, x0, sigma, sigma_next, self.x0_prev, self.sigma_prev)
            if self.solver == "dpm2m":  # the history: this step's x0 prediction, computed once
                self.x0_prev, self.sigma_prev = x0, sigma
            return out
        else:
            raise ValueError(f"ode_solver: unknown solver {solver!r}")
        self.observe(x, v, sigma)
        return out


def _progress_bar(total: int, progress: Optional[bool]):
    enabled = sys.stderr.isatty() if progress is None else bool(progress)
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", leave=False)


# --------------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------------


def sample(
    policy: Any,
    prompts: list[str],
    plan: Plan,
    *,
    group_size: int,
    height: int,
    width: int,
    guidance_scale: float,
    generator: Optional[torch.Generator] | Sequence[torch.Generator],
    same_noise: bool = False,
    negative_prompt: str = "",
    store_dtype: torch.dtype = torch.float32,
    decode: bool = True,
    store_means: bool = True,
    chunk_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Rollout:
    """Sample ``group_size`` trajectories for each prompt following ``plan`` (no grad).

    ``generator`` drives every random draw (initial noise, SDE noise, per-sample trained subsets),
    so a fixed seed gives identical rollouts. It may also be a list of one generator per prompt:
    then every draw for prompt p's rows comes from ``generator[p]``, so a prompt's samples do not
    depend on the other prompts in the batch (what makes a data-parallel run equal to a
    single-process run). ``same_noise``: the samples of a prompt share their
    initial noise and ODE prefix (computed once per prompt). For tree plans ``group_size`` must be a
    multiple of ``plan.leaves``. ``store_dtype``: dtype of stored latents and means (log-probs are
    taken on the rounded values). ``chunk_size``: at most this many rows per velocity call.
    ``progress``: show a tqdm bar over steps (None: only when stderr is a terminal).
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts: must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: every prompt must be a string")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size: must be an int >= 1, got {group_size!r}")
    if bool((plan.branch > 1).any()) and (not plan.is_tree or bool((plan.branch[~plan.sde] > 1).any())):
        raise ValueError("plan: branching (branch > 1) is only supported on the SDE steps of a 'tree' plan")
    if plan.is_tree and group_size % plan.leaves != 0:
        raise ValueError(f"group_size: a tree plan with branch factors "
                         f"{[int(b) for b in plan.branch[plan.sde].tolist()]} has {plan.leaves} leaves per "
                         f"tree; group_size ({group_size}) must be a multiple of it")
    if height < 1 or width < 1:
        raise ValueError(f"height/width: must be positive, got {height}x{width}")
    if not isinstance(store_dtype, torch.dtype) or not store_dtype.is_floating_point:
        raise ValueError(f"store_dtype: must be a floating torch.dtype, got {store_dtype!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1 or None, got {chunk_size}")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise ValueError(f"generator: a list needs one generator per prompt ({len(prompts)}), got {len(generator)}")
    if plan.sweep:
        if not same_noise:
            raise ValueError("same_noise: a singular sweep (plan.singular.choice: all) branches every step from "
                             "ONE ODE trunk per prompt, so it needs same_noise=True (sample.same_noise: true)")
        with torch.no_grad():
            return _sample_sweep(policy, list(prompts), plan, group_size, height, width, float(guidance_scale),
                                 generator, negative_prompt, store_dtype, decode, store_means, chunk_size, progress)
    with torch.no_grad():
        return _sample(policy, list(prompts), plan, group_size, height, width, float(guidance_scale), generator,
                       same_noise, negative_prompt, store_dtype, decode, store_means, chunk_size, progress)


def _per_prompt_noise(x: Tensor, generators: Sequence[torch.Generator], num_prompts: int) -> Tensor:
    """Standard normal noise shaped like ``x`` whose rows of prompt p (rows are prompt-major, an
    equal number per prompt) come from ``generators[p]``."""
    per = x.shape[0] // num_prompts
    parts = [torch.randn((per, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(parts).to(x.device)


def _initial_noise(policy, per_prompt: int, num_prompts: int, height: int, width: int, generator) -> Tensor:
    """The ``per_prompt`` initial-noise rows of every prompt (prompt-major), float32: from
    ``generator[p]`` for prompt p when ``generator`` is a list, else in one draw."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([policy.initial_noise(per_prompt, height, width, g).to(torch.float32) for g in generator])
    return policy.initial_noise(num_prompts * per_prompt, height, width, generator).to(torch.float32)


def _child_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator on ``generator``'s device seeded by one 63-bit draw from it."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())
    return torch.Generator(device=generator.device).manual_seed(seed)


def _sample_sweep(policy, prompts, plan: Plan, G, height, width, guidance_scale, generator, negative_prompt,
                  store_dtype, decode, store_means, chunk_size, progress) -> Rollout:
    """A sweep (see the module doc): one singular sampling per branch step k, all from the same
    initial noise (one row per prompt) and prompt embeddings, concatenated prompt-major.

    Cost against an ideal shared trunk: branch k recomputes the trunk up to x_k and its velocity
    there, (k + 1)·P velocity rows, so the sweep spends P·sum_k (k + 1) trunk rows where one shared
    trunk would spend P·(k_max + 1). The branches cost G·P·sum_k sum_g (tail steps after k at
    granularity g) rows whatever the layout: for G²RPO (16 steps, k = 0..7, G = 12, granularities
    [1, 2]) 36·P trunk rows instead of 8·P, beside 1680·P branch rows (+1.7 %).
    """
    P = len(prompts)
    steps = plan.sde_steps
    K = len(steps)
    embeds = policy.encode_prompts(prompts, negative_prompt=negative_prompt)
    init = _initial_noise(policy, 1, P, height, width, generator)
    # the SDE noise of branch j: a generator per branch (per prompt and branch for a list)
    if isinstance(generator, (list, tuple)):
        per_prompt = [[_child_generator(g) for _ in range(K)] for g in generator]
        branch_gens: list[Any] = [[per_prompt[p][j] for p in range(P)] for j in range(K)]
    else:
        branch_gens = [_child_generator(generator) for _ in range(K)]
    parts = [_sample(policy, prompts, plan.singular_at(k), G, height, width, guidance_scale, branch_gens[j], True,
                     negative_prompt, store_dtype, decode, store_means, chunk_size, progress,
                     embeds=embeds, init_noise=init)
             for j, k in enumerate(steps)]
    # rows of part j are prompt-major (p·G + g): reorder to p·K·G + j·G + g
    cat = {}
    for name in Rollout._ROW_FIELDS:
        values = [getattr(r, name) for r in parts]
        if all(v is not None for v in values):
            cat[name] = torch.cat(values, dim=0)
    device = parts[0].prompt_index.device
    j_idx = torch.arange(K, device=device)
    order = (j_idx.view(1, K, 1) * (P * G) + torch.arange(P, device=device).view(P, 1, 1) * G
             + torch.arange(G, device=device).view(1, 1, G)).reshape(-1)
    rows = {name: v[order.to(v.device)] for name, v in cat.items()}
    prompt_index = rows["prompt_index"]
    branch = j_idx.repeat_interleave(G).repeat(P)  # j of each row
    rows["group_id"] = prompt_index * K + branch
    rows["branch_step"] = torch.tensor(steps, dtype=torch.long, device=device)[branch]
    return replace(
        parts[0],
        **rows,
        step_index=torch.full((1,), -1, dtype=torch.long, device=device),
        groups_per_prompt=K,
        nfe=sum(r.nfe for r in parts),
        velocity_calls=sum(r.velocity_calls for r in parts),
        plan_kind=plan.kind,
    )


def _sample(policy, prompts, plan: Plan, G, height, width, guidance_scale, generator, same_noise,
            negative_prompt, store_dtype, decode, store_means, chunk_size, progress, *,
            embeds: Any = None, init_noise: Optional[Tensor] = None) -> Rollout:
    """One rollout (see :func:`sample`). ``embeds``: the prompts' embeddings if already encoded;
    ``init_noise``: the initial rows (``P × rows per prompt``, prompt-major) instead of a draw
    from ``generator``, which then drives the other draws only."""
    P = len(prompts)
    N = P * G
    S = plan.num_steps
    sigmas = policy.sigmas(S, height, width).detach().to("cpu", torch.float32)
    if sigmas.shape != (S + 1,):
        raise ValueError(f"plan: has {S} steps but policy.sigmas returned shape {tuple(sigmas.shape)}")
    if embeds is None:
        embeds = policy.encode_prompts(prompts, negative_prompt=negative_prompt)

    sde_steps = plan.sde_steps
    first = sde_steps[0] if sde_steps else None
    head_end = sde_steps[-1] + 1 if sde_steps else 0
    span = list(range(first, head_end)) if sde_steps else []

    # expansion factor of each step (applied to every row at SDE steps) and rows per prompt at start
    factors = [int(b) for b in plan.branch.tolist()]
    sde_list = [bool(b) for b in plan.sde.tolist()]
    noise_list = [float(a) for a in plan.noise_level.tolist()]
    if plan.is_tree:
        n_trees = G // plan.leaves
        if same_noise:
            init_per_prompt = 1
            factors[first] *= n_trees
        else:
            init_per_prompt = n_trees
    elif same_noise:
        init_per_prompt = 1
        if first is not None:
            factors[first] = G
    else:
        init_per_prompt = G

    rows = P * init_per_prompt
    per_prompt = isinstance(generator, (list, tuple))
    if init_noise is not None:
        if init_noise.shape[0] != rows:
            raise ValueError(f"init_noise: needs {rows} rows ({init_per_prompt} per prompt), got {init_noise.shape[0]}")
        x = init_noise.to(torch.float32)
    else:
        x = _initial_noise(policy, init_per_prompt, P, height, width, generator)
    device = x.device
    row_prompt = torch.arange(P, device=device).repeat_interleave(init_per_prompt)
    vel = _Velocity(policy, embeds, guidance_scale, chunk_size)
    vel.set_rows(row_prompt)
    ode = _Deterministic(plan.ode_solver, vel)

    tree = plan.is_tree
    if tree:
        node_parent = [torch.full((rows,), -1, dtype=torch.long, device=device)]
        node_step = [torch.full((rows,), -1, dtype=torch.long, device=device)]
        node_prompt = [row_prompt]
        row_node = torch.arange(rows, dtype=torch.long, device=device)
        next_id = rows
        depth_nodes: list[Tensor] = []
    step_nodes: list[Optional[Tensor]] = []

    xs_in: list[Tensor] = []
    recs: list[tuple[Tensor, Optional[Tensor], Tensor, int]] = []  # (log_prob, mean, std, rows_out)

    n_tail = 0
    for g in plan.granularities:
        n_tail += max(0, tail_sigmas(plan, sigmas, head_end, g).numel() - 1)
    bar = _progress_bar(head_end + n_tail, progress)

    # ---- head: steps 0 .. last SDE step -------------------------------------------------------
    for i in range(head_end):
        in_span = i >= first
        if in_span:
            x = _round(x, store_dtype)
        sig = _full(rows, sigmas[i], device)
        sig_n = _full(rows, sigmas[i + 1], device)
        v = vel(x, sig)
        if sde_list[i]:
            ode.observe(x, v, sig)
            xs_in.append(x)
            f = factors[i]
            if f > 1:
                idx = torch.arange(rows, device=device).repeat_interleave(f)
                x, v, row_prompt = x[idx], v[idx], row_prompt[idx]
                ode.expand(idx)
                rows *= f
                sig = _full(rows, sigmas[i], device)
                sig_n = _full(rows, sigmas[i + 1], device)
                vel.set_rows(row_prompt)
            if tree:
                parent = row_node.repeat_interleave(f)
                row_node = torch.arange(next_id, next_id + rows, dtype=torch.long, device=device)
                next_id += rows
                node_parent.append(parent)
                node_step.append(torch.full((rows,), i, dtype=torch.long, device=device))
                node_prompt.append(row_prompt)
                depth_nodes.append(row_node)
            step_nodes.append(row_node if tree else None)
            a = noise_list[i]
            noise = _per_prompt_noise(x, generator, P) if per_prompt else None
            drawn = sde_step(x, v, sig, sig_n, a, None if per_prompt else generator, kind=plan.sde_kind,
                             reduction=plan.reduction, noise=noise)
            x_next = _round(drawn.prev_sample, store_dtype)
            scored = sde_step(x, v, sig, sig_n, a, prev_sample=x_next, kind=plan.sde_kind, reduction=plan.reduction)
            mean = scored.mean.to(store_dtype) if store_means else None
            recs.append((scored.log_prob.float(), mean, _std_rows(scored.std, rows), rows))
            x = x_next
        else:
            x_next = ode.step(x, v, sig, sig_n, solver=None if in_span else plan.head_solver)
            if in_span:
                xs_in.append(x)
                x_next = _round(x_next, store_dtype)
                mean = x_next.to(store_dtype) if store_means else None
                recs.append((torch.zeros(rows, device=device), mean, torch.zeros(rows, device=device), rows))
                step_nodes.append(None)
            x = x_next
        if bar is not None:
            bar.update(1)
    head_x, head_rows = x, rows
    head_history = (ode.x0_prev, ode.sigma_prev)

    # ---- tail: one deterministic continuation per granularity ----------------------------------
    finals = []
    for g in plan.granularities:
        tail = tail_sigmas(plan, sigmas, head_end, g)
        xg = head_x
        ode.x0_prev, ode.sigma_prev = head_history
        for j in range(tail.numel() - 1):
            sig = _full(head_rows, tail[j], device)
            sig_n = _full(head_rows, tail[j + 1], device)
            v = vel(xg, sig)
            xg = ode.step(xg, v, sig, sig_n)
            if bar is not None:
                bar.update(1)
        finals.append(xg)
    if bar is not None:
        bar.close()

    # ---- assemble: everything to the N final rows ---------------------------------------------
    T = len(span)
    latent_shape = tuple(head_x.shape[1:])
    latents = torch.empty((N, T + 1, *latent_shape), dtype=store_dtype, device=device)
    for t, xt in enumerate(xs_in):
        latents[:, t] = _expand_rows(xt, N).to(store_dtype)
    latents[:, T] = _expand_rows(head_x, N).to(store_dtype)  # T = 0: the initial noise
    means = torch.empty((N, T, *latent_shape), dtype=store_dtype, device=device) if store_means else None
    log_probs = torch.zeros(N, T, device=device)
    stds = torch.zeros(N, T, device=device)
    for t, (lp, mean, std, _) in enumerate(recs):
        log_probs[:, t] = _expand_rows(lp, N)
        stds[:, t] = _expand_rows(std, N)
        if means is not None:
            means[:, t] = _expand_rows(mean, N)
    span_idx = torch.tensor(span, dtype=torch.long)

    def per_row(values: Tensor) -> Tensor:  # a [T] per-step tensor as [N, T] on the rollout's device
        return values.unsqueeze(0).expand(N, T).clone().to(device)

    sig_rows = per_row(sigmas[span_idx])
    sig_next_rows = per_row(sigmas[span_idx + 1])
    noise_rows = per_row(plan.noise_level[span_idx].float())
    stochastic = per_row(plan.sde[span_idx])
    if plan.subset_size > 0:
        if per_prompt:
            trained = torch.cat([plan.trained_mask(G, g) for g in generator])[:, span_idx].to(device)
        else:
            trained = plan.trained_mask(N, generator)[:, span_idx].to(device)
    else:
        trained = per_row(plan.trained[span_idx])
    if plan.tree_dedup:
        for t, (_, _, _, r_out) in enumerate(recs):
            if r_out < N:  # this transition is shared by N // r_out leaves: keep it on the first one
                trained[:, t] &= (torch.arange(N, device=device) % (N // r_out)) == 0

    final_latents = torch.stack([_expand_rows(f, N) for f in finals], dim=1).to(store_dtype)
    images = per_gran = None
    if decode:
        decoded = []
        for f in finals:
            imgs = torch.cat([policy.decode(f[a:a + (chunk_size or head_rows)])
                              for a in range(0, head_rows, chunk_size or head_rows)], dim=0)
            decoded.append(_expand_rows(imgs.float(), N))
        per_gran = torch.stack(decoded, dim=1)
        images = per_gran[:, 0]

    logger.debug("rollout: %s | %d prompts x %d | nfe %d in %d calls", plan.describe(), P, G, vel.nfe, vel.calls)
    prompt_index = torch.arange(P, device=device).repeat_interleave(G)
    out = Rollout(
        latents=latents,
        means=means,
        log_probs=log_probs,
        stds=stds,
        sigmas=sig_rows,
        sigma_next=sig_next_rows,
        noise_levels=noise_rows,
        stochastic=stochastic,
        trained=trained,
        step_index=span_idx.to(device),
        final_latents=final_latents,
        prompt_index=prompt_index,
        group_id=prompt_index.clone(),
        embeds=dict(embeds.tensors()),
        prompts=list(prompts),
        images=images,
        images_per_granularity=per_gran,
        granularities=tuple(plan.granularities),
        nfe=vel.nfe,
        velocity_calls=vel.calls,
        sde_kind=plan.sde_kind,
        reduction=plan.reduction,
        guidance_scale=guidance_scale,
        num_steps=S,
        height=height,
        width=width,
        plan_kind=plan.kind,
    )
    if tree:
        out.node_parent = torch.cat(node_parent)
        out.node_step = torch.cat(node_step)
        out.node_prompt = torch.cat(node_prompt)
        out.leaf_path = torch.stack([_expand_rows(d, N) for d in depth_nodes], dim=1)
        out.step_node = torch.stack(
            [_expand_rows(s, N) if s is not None else torch.full((N,), -1, dtype=torch.long, device=device)
             for s in step_nodes],
            dim=1,
        ) if step_nodes else torch.zeros(N, 0, dtype=torch.long, device=device)
    return out

