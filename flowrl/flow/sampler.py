"""Run a sampling :class:`~flowrl.flow.plan.Plan` with a flow policy and return a :class:`Rollout`.

Each step moves ``x`` from ``sigma`` to ``sigma_next`` with the policy's velocity ``v``: an ODE step
(Euler ``x' = x + (sigma_next - sigma) v``, or Heun / DPM-Solver++(2M)), or, where the plan says so,
an SDE step ``x' ~ N(mu(x, v), s^2 I)`` whose log-prob is stored for the GRPO update (Flow-GRPO,
arXiv 2505.05470; the dynamics are :func:`flowrl.flow.steps.sde_step`'s). Rows multiply only at SDE
steps (``same_noise`` groups, trees as in TempFlow-GRPO arXiv 2508.04324 and G²RPO arXiv
2510.01982, whose node velocities are computed once). :func:`sample` runs in phases like a
diffusers pipeline call: check inputs, sigmas and prompt embeddings, initial noise, the head (steps
up to the last SDE step), one ODE tail per granularity, the Rollout. Only the span from the first
to the last SDE step is stored, every state rounded through ``store_dtype`` before it is used or
scored, so a recomputed transition scores exactly what was stored. Rows, NFE, storage, sweeps and
tails in detail: ``docs/methods.md`` (flowrl.flow.sampler).

The sampler needs only this protocol from ``policy`` (:class:`flowrl.flow.policy.FlowPolicy`
implements it):

* ``encode_prompts(prompts, negative_prompt="") -> embeds`` with ``embeds.select(index)``
  (rows by index) and ``embeds.tensors() -> dict[str, Tensor]``;
* ``latent_shape(height, width)``, ``initial_noise(batch, height, width, generator)``,
  ``sigmas(num_steps, height, width)`` (``num_steps + 1`` sigmas ending with 0);
* ``velocity(x, sigma, embeds, guidance_scale)`` (``sigma`` a ``[B]`` tensor);
* ``decode(x) -> [B, 3, H, W]`` in [0, 1] (video families: frames ``[B, 3, F, H, W]``; the sampler keeps
  whatever ``decode`` returns, row by row).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple, Optional, Sequence

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

__all__ = ["Rollout", "concat_rollouts", "sample", "tail_sigmas"]


# --------------------------------------------------------------------------------------------------
# Rollout
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout of ``P`` prompts × ``G`` samples (``N = P·G`` rows, prompt-major), plain tensors.

    Per stored transition t (``T`` of them, the span from the first to the last SDE step):
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
    and ``groups_per_prompt = K`` (see ``docs/methods.md``).

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
    images: Optional[Tensor]  # [N, 3, H, W] (videos: [N, 3, F, H, W]) float32 in [0, 1] (first granularity), None if decode=False
    images_per_granularity: Optional[Tensor]  # [N, n_granularities, 3, H, W]
    granularities: tuple[int, ...]
    node_parent: Optional[Tensor] = None  # [M] int64, trees only
    node_step: Optional[Tensor] = None  # [M] int64
    node_prompt: Optional[Tensor] = None  # [M] int64
    leaf_path: Optional[Tensor] = None  # [N, depth] int64
    step_node: Optional[Tensor] = None  # [N, T] int64
    branch_step: Optional[Tensor] = None  # [N] int64, sweeps only: the step k at which the row branched off the trunk
    # forward-process objectives (flowrl.flow.forward): each row's stream keys (step, record, position, member),
    # the rows that carry a loss (valid samples; dpo: pair winners) and dpo's roles (+1 winner, -1 loser, 0)
    row_keys: Optional[Tensor] = None  # [N, 4] int64
    sample_mask: Optional[Tensor] = None  # [N] bool
    pair_role: Optional[Tensor] = None  # [N] int64
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
        "leaf_path", "step_node", "branch_step", "row_keys", "sample_mask", "pair_role",
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


# fields every part of a concatenation must share (they describe the plan and the call, not a row)
_SHARED_FIELDS = ("step_index", "granularities", "groups_per_prompt", "sde_kind", "reduction", "guidance_scale",
                  "num_steps", "height", "width", "plan_kind")
# per-row or per-node fields that hold node numbers (-1: none), shifted by the nodes of earlier parts
_NODE_FIELDS = ("node_parent", "leaf_path", "step_node")


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    """The rollouts of consecutive prompt sub-batches (each a full :func:`sample` call with the same
    plan) as one rollout of all their prompts, rows in order: part 0's rows, then part 1's, ...

    Per-row fields are concatenated; ``prompt_index`` and ``node_prompt`` are shifted by the prompts
    of earlier parts, ``group_id`` by their groups (prompts x ``groups_per_prompt``), node numbers
    (``node_parent``, ``leaf_path``, ``step_node``; -1 kept) by their nodes; prompts and prompt
    embeddings are concatenated (embeddings of different sequence lengths padded to the longest with
    their masks, :func:`flowrl.flow.policy.pad_rows`, as one call pads its prompts); ``nfe`` and
    ``velocity_calls`` are summed. Fields that describe the plan (``step_index``, ``granularities``,
    ``sde_kind``, ...) must be equal in every part: a ValueError names the first that is not, and a
    field present in some parts and None in others."""
    parts = list(parts)
    if not parts:
        raise ValueError("parts: no rollout to concatenate")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for name in _SHARED_FIELDS:
        a = getattr(first, name)
        for j, r in enumerate(parts[1:], 1):
            b = getattr(r, name)
            same = torch.equal(a.cpu(), b.cpu()) if isinstance(a, Tensor) else a == b
            if not same:
                raise ValueError(f"parts: {name} of part {j} ({b!r}) differs from part 0's ({a!r}); "
                                 "only rollouts of one plan and one sampling call's settings concatenate")
    changes: dict[str, Any] = {}
    for name in (*Rollout._ROW_FIELDS, "node_parent", "node_step", "node_prompt"):
        values = [getattr(r, name) for r in parts]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            raise ValueError(f"parts: {name} is set in some parts and None in others")
        changes[name] = values
    p_off = g_off = n_off = 0
    for j, r in enumerate(parts):  # shift the indices of part j past those of parts 0 .. j-1
        for name, shift in (("prompt_index", p_off), ("node_prompt", p_off), ("group_id", g_off),
                            *((n, n_off) for n in _NODE_FIELDS)):
            if name in changes and shift:
                v = changes[name][j]
                changes[name][j] = torch.where(v >= 0, v + shift, v)
        p_off += len(r.prompts)
        g_off += len(r.prompts) * r.groups_per_prompt
        n_off += 0 if r.node_parent is None else int(r.node_parent.shape[0])
    cat = {name: torch.cat([v.to(values[0].device) for v in values], dim=0) for name, values in changes.items()}
    from flowrl.flow.policy import pad_rows  # the padding rule of prompt embeddings (a light module)

    keys = list(first.embeds)
    if any(list(r.embeds) != keys for r in parts):
        raise ValueError("parts: the prompt embeddings of the parts have different fields")
    rows = [{k: r.embeds[k][i] for k in keys} for r in parts for i in range(len(r.prompts))]
    embeds = {k: v.to(first.embeds[k].device) for k, v in pad_rows(rows).items()}
    return replace(first, **cat, embeds=embeds, prompts=[p for r in parts for p in r.prompts],
                   nfe=sum(r.nfe for r in parts), velocity_calls=sum(r.velocity_calls for r in parts))


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
    from tqdm.auto import tqdm  # optional: only when a bar is shown

    return tqdm(total=total, desc="sampling", leave=False)


# --------------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------------


def sample(
    policy: Any,
    prompts: list[str],
    plan: Plan,
    *,
    group_size: int | Sequence[int],
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
    images: Optional[Sequence[Any]] = None,
    decode_chunk_size: Optional[int] = None,
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
    ``decode_chunk_size``: at most this many rows per VAE decode (None: ``chunk_size``), the decode's peak
    memory grows with its rows (a video VAE's most of all).
    ``progress``: show a tqdm bar over steps (None: only when stderr is a terminal). ``images``
    (editing models): one source image per prompt, passed to ``policy.encode_prompts(..., images=)``.

    ``group_size`` may be a list of one size per prompt (per-prompt rollout budgets): the prompts of
    one size are then sampled together, one call per size, from embeddings encoded once, and the rows
    come back prompt-major in the prompts' order (:func:`_sample_sizes`). That needs a generator per
    prompt (so a prompt's draws do not depend on its companions) and a flat plan (no tree, no sweep).
    Equal sizes are the plain call.
    """
    sizes = None
    if not isinstance(group_size, int):
        sizes = _group_sizes(group_size, prompts)
        group_size = sizes[0] if len(set(sizes)) == 1 else max(sizes)
    call = _Call(policy, prompts, plan, group_size, height, width, guidance_scale, generator, same_noise,
                 negative_prompt, store_dtype, decode, store_means, chunk_size, progress,
                 images=None if images is None else list(images), decode_chunk_size=decode_chunk_size)
    _check_inputs(call)
    call = replace(call, prompts=list(prompts), guidance_scale=float(guidance_scale))
    with torch.no_grad():
        if sizes is not None and len(set(sizes)) > 1:
            return _sample_sizes(call, sizes)
        return _sample_sweep(call) if plan.sweep else _sample(call)


@dataclass
class _Call:
    """The arguments of one sampling call (see :func:`sample`), read by every phase."""

    policy: Any
    prompts: list[str]
    plan: Plan
    group_size: int  # G
    height: int
    width: int
    guidance_scale: float
    generator: Any  # a torch.Generator, or a list of one per prompt
    same_noise: bool
    negative_prompt: str
    store_dtype: torch.dtype
    decode: bool
    store_means: bool
    chunk_size: Optional[int]
    progress: Optional[bool]
    embeds: Any = None  # the prompts' embeddings when already encoded (a sweep encodes once)
    init_noise: Optional[Tensor] = None  # the initial rows (prompt-major) instead of a draw from ``generator``
    images: Optional[list] = None  # one source image per prompt (editing models), or None
    decode_chunk_size: Optional[int] = None  # rows per VAE decode (None: chunk_size)

    @property
    def num_prompts(self) -> int:  # P
        return len(self.prompts)

    @property
    def num_rows(self) -> int:  # N = P·G, the final rows
        return len(self.prompts) * self.group_size

    @property
    def per_prompt(self) -> bool:
        """Whether ``generator`` is a list of one generator per prompt."""
        return isinstance(self.generator, (list, tuple))


class _Stored(NamedTuple):
    """One stored transition as the head loop produced it (rows of that step, not yet the N final rows)."""

    x_in: Tensor  # the state entering the step (before any branching at it)
    log_prob: Tensor  # [rows] (0 on an ODE step)
    mean: Optional[Tensor]  # [rows, *latent_shape] in store_dtype (None if store_means=False)
    std: Tensor  # [rows]
    rows: int  # rows after the step: the transition is shared by N // rows final rows


@dataclass
class _Tree:
    """The nodes of a tree rollout: one root per row at the start, one node per row at each SDE step."""

    parent: list[Tensor]  # per level: [nodes] parent of each node (-1 for a root)
    step: list[Tensor]  # per level: [nodes] the step that created the node (-1 for a root)
    prompt: list[Tensor]  # per level: [nodes] the node's prompt
    row_node: Tensor  # [rows] the node of each current row
    next_id: int
    depth_nodes: list[Tensor] = field(default_factory=list)  # row_node after each SDE step
    step_nodes: list[Optional[Tensor]] = field(default_factory=list)  # per stored step: its node (None: ODE)

    @classmethod
    def roots(cls, row_prompt: Tensor) -> "_Tree":
        rows, device = int(row_prompt.shape[0]), row_prompt.device
        return cls(parent=[torch.full((rows,), -1, dtype=torch.long, device=device)],
                   step=[torch.full((rows,), -1, dtype=torch.long, device=device)],
                   prompt=[row_prompt], row_node=torch.arange(rows, dtype=torch.long, device=device), next_id=rows)

    def grow(self, step: int, factor: int, row_prompt: Tensor) -> None:
        """The nodes created at SDE step ``step``, where every row became ``factor`` rows."""
        rows, device = int(row_prompt.shape[0]), row_prompt.device
        parent = self.row_node.repeat_interleave(factor)
        self.row_node = torch.arange(self.next_id, self.next_id + rows, dtype=torch.long, device=device)
        self.next_id += rows
        self.parent.append(parent)
        self.step.append(torch.full((rows,), step, dtype=torch.long, device=device))
        self.prompt.append(row_prompt)
        self.depth_nodes.append(self.row_node)
        self.step_nodes.append(self.row_node)

    def rollout_fields(self, n: int) -> dict[str, Tensor]:
        """The tree fields of the :class:`Rollout` on its ``n`` final rows."""
        device = self.row_node.device
        none = torch.full((n,), -1, dtype=torch.long, device=device)
        step_node = (torch.stack([none if s is None else _expand_rows(s, n) for s in self.step_nodes], dim=1)
                     if self.step_nodes else torch.zeros(n, 0, dtype=torch.long, device=device))
        return dict(node_parent=torch.cat(self.parent), node_step=torch.cat(self.step),
                    node_prompt=torch.cat(self.prompt),
                    leaf_path=torch.stack([_expand_rows(d, n) for d in self.depth_nodes], dim=1),
                    step_node=step_node)


@dataclass
class _State:
    """One rollout in progress: the current rows, their solvers and what the head has stored so far."""

    call: _Call
    sigmas: Tensor  # [S + 1] float32 on the CPU
    embeds: Any
    span: range  # the stored steps: first .. last SDE step (empty without one)
    factors: list[int]  # every row becomes factors[i] rows at SDE step i
    x: Tensor  # the current rows, in leaf order
    row_prompt: Tensor  # [rows] the prompt of each current row
    vel: _Velocity
    ode: _Deterministic
    bar: Any  # a tqdm bar, or None
    stored: list[_Stored] = field(default_factory=list)
    tree: Optional[_Tree] = None
    # the plan's per-step flags and noise levels as Python values, read once: the step loop reads no tensor
    # on the host (on an accelerator every such read waits for the device)
    sde_flags: list[bool] = field(default_factory=list)
    noise_levels: list[float] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    def full(self, value: Tensor) -> Tensor:
        """A per-row sigma tensor on the current rows."""
        return _full(self.rows, value, self.x.device)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)


# ---- phase 0: check inputs --------------------------------------------------------------------------


def _check_inputs(call: _Call) -> None:
    """Raise ``ValueError("<argument>: <reason>")`` for arguments :func:`sample` cannot run."""
    plan, prompts, G = call.plan, call.prompts, call.group_size
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts: must be a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: every prompt must be a string")
    if not isinstance(G, int) or G < 1:
        raise ValueError(f"group_size: must be an int >= 1, got {G!r}")
    if bool((plan.branch > 1).any()) and (not plan.is_tree or bool((plan.branch[~plan.sde] > 1).any())):
        raise ValueError("plan: branching (branch > 1) is only supported on the SDE steps of a 'tree' plan")
    if plan.is_tree and G % plan.leaves != 0:
        raise ValueError(f"group_size: a tree plan with branch factors "
                         f"{[int(b) for b in plan.branch[plan.sde].tolist()]} has {plan.leaves} leaves per "
                         f"tree; group_size ({G}) must be a multiple of it")
    if call.height < 1 or call.width < 1:
        raise ValueError(f"height/width: must be positive, got {call.height}x{call.width}")
    if not isinstance(call.store_dtype, torch.dtype) or not call.store_dtype.is_floating_point:
        raise ValueError(f"store_dtype: must be a floating torch.dtype, got {call.store_dtype!r}")
    for name in ("chunk_size", "decode_chunk_size"):
        value = getattr(call, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: must be an int >= 1 or None, got {value!r}")
    if call.images is not None and len(call.images) != len(prompts):
        raise ValueError(f"images: give one source image per prompt ({len(prompts)}), got {len(call.images)}")
    if call.per_prompt and len(call.generator) != len(prompts):
        raise ValueError(f"generator: a list needs one generator per prompt ({len(prompts)}), "
                         f"got {len(call.generator)}")
    if plan.sweep and not call.same_noise:
        raise ValueError("same_noise: a singular sweep (plan.singular.choice: all) branches every step from "
                         "ONE ODE trunk per prompt, so it needs same_noise=True (sample.same_noise: true)")


# ---- the sampling of one plan, in phases ---------------------------------------------------------------


def _sample(call: _Call) -> Rollout:
    """One rollout (see :func:`sample`), phase by phase."""
    # 1. the noise schedule and the prompt embeddings
    sigmas = _sigmas(call)
    embeds = _encode_prompts(call)
    # 2. the starting rows (one per prompt, tree or sample) and their initial noise
    st = _prepare(call, sigmas, embeds)
    # 3. the head: steps 0 .. the last SDE step; rows branch at SDE steps
    for i in range(st.span.stop):
        _head_step(st, i)
    # 4. the tail: one deterministic continuation per granularity
    finals = _tails(st)
    # 5. the Rollout on the N final rows
    return _assemble(st, finals)


def _sigmas(call: _Call) -> Tensor:
    """The policy's ``S + 1`` sigmas, float32 on the CPU."""
    S = call.plan.num_steps
    sigmas = call.policy.sigmas(S, call.height, call.width).detach().to("cpu", torch.float32)
    if sigmas.shape != (S + 1,):
        raise ValueError(f"plan: has {S} steps but policy.sigmas returned shape {tuple(sigmas.shape)}")
    if not bool(((sigmas >= 0) & (sigmas <= 1)).all()):  # checked once here, on the host (the steps pass them on the device)
        raise ValueError(f"policy.sigmas: must lie in [0, 1], got {sigmas.tolist()}")
    return sigmas


def _encode_prompts(call: _Call) -> Any:
    if call.embeds is not None:
        return call.embeds
    if call.images is not None:
        return call.policy.encode_prompts(call.prompts, negative_prompt=call.negative_prompt, images=call.images)
    return call.policy.encode_prompts(call.prompts, negative_prompt=call.negative_prompt)


def _row_layout(call: _Call) -> tuple[int, list[int]]:
    """Rows per prompt at the start, and the factor by which every row multiplies at each step:
    ``G`` samples from the start, or (``same_noise``) one row per prompt that becomes ``G`` at the
    first SDE step; a tree starts with one row per tree (or one per prompt with ``same_noise``,
    its first branching then also splitting the trees)."""
    plan, G = call.plan, call.group_size
    factors = [int(b) for b in plan.branch.tolist()]
    first = plan.first_sde
    if plan.is_tree:
        n_trees = G // plan.leaves
        if not call.same_noise:
            return n_trees, factors
        factors[first] *= n_trees
        return 1, factors
    if not call.same_noise:
        return G, factors
    if first is not None:
        factors[first] = G
    return 1, factors


def _prepare(call: _Call, sigmas: Tensor, embeds: Any) -> _State:
    """The state before step 0: the initial noise, the velocity and solver, the tree roots."""
    plan = call.plan
    sde_steps = plan.sde_steps
    span = range(sde_steps[0], sde_steps[-1] + 1) if sde_steps else range(0)
    init_per_prompt, factors = _row_layout(call)
    x = _start_noise(call, init_per_prompt)
    row_prompt = torch.arange(call.num_prompts, device=x.device).repeat_interleave(init_per_prompt)
    vel = _Velocity(call.policy, embeds, call.guidance_scale, call.chunk_size)
    vel.set_rows(row_prompt)
    n_tail = sum(max(0, tail_sigmas(plan, sigmas, span.stop, g).numel() - 1) for g in plan.granularities)
    return _State(call, sigmas, embeds, span, factors, x, row_prompt, vel, _Deterministic(plan.ode_solver, vel),
                  bar=_progress_bar(span.stop + n_tail, call.progress),
                  tree=_Tree.roots(row_prompt) if plan.is_tree else None,
                  sde_flags=[bool(b) for b in plan.sde.tolist()],
                  noise_levels=[float(a) for a in plan.noise_level.tolist()])


def _start_noise(call: _Call, per_prompt: int) -> Tensor:
    """The starting rows: ``call.init_noise`` when given, else drawn."""
    if call.init_noise is None:
        return _initial_noise(call, per_prompt)
    rows = call.num_prompts * per_prompt
    if call.init_noise.shape[0] != rows:
        raise ValueError(f"init_noise: needs {rows} rows ({per_prompt} per prompt), got {call.init_noise.shape[0]}")
    return call.init_noise.to(torch.float32)


def _initial_noise(call: _Call, per_prompt: int) -> Tensor:
    """The ``per_prompt`` initial-noise rows of every prompt (prompt-major), float32: from
    ``generator[p]`` for prompt p when ``generator`` is a list, else in one draw."""
    policy, h, w = call.policy, call.height, call.width
    if call.per_prompt:
        return torch.cat([policy.initial_noise(per_prompt, h, w, g).to(torch.float32) for g in call.generator])
    return policy.initial_noise(call.num_prompts * per_prompt, h, w, call.generator).to(torch.float32)


def _head_step(st: _State, i: int) -> None:
    """Step ``i`` before the tail: a stochastic step, or an ODE step (stored inside the span)."""
    if i in st.span:  # a stored state is rounded through store_dtype before it is used
        st.x = _round(st.x, st.call.store_dtype)
    sig = st.full(st.sigmas[i])
    v = st.vel(st.x, sig)
    if st.sde_flags[i]:
        _sde_step(st, i, v, sig)
    else:
        _ode_step(st, i, v, sig)
    st.tick()


def _sde_step(st: _State, i: int, v: Tensor, sig: Tensor) -> None:
    """A stochastic step: rows branch (the node's velocity is reused by its children), each row
    draws x', and the rounded x' is scored."""
    call, plan = st.call, st.call.plan
    st.ode.observe(st.x, v, sig)
    x_in, factor = st.x, st.factors[i]
    if factor > 1:
        v = _branch(st, factor, v)
    if st.tree is not None:
        st.tree.grow(i, factor, st.row_prompt)
    sig, sig_n = st.full(st.sigmas[i]), st.full(st.sigmas[i + 1])
    a = st.noise_levels[i]
    noise = _per_prompt_noise(st.x, call.generator, call.num_prompts) if call.per_prompt else None
    drawn = sde_step(st.x, v, sig, sig_n, a, None if call.per_prompt else call.generator, kind=plan.sde_kind,
                     reduction=plan.reduction, noise=noise)
    x_next = _round(drawn.prev_sample, call.store_dtype)
    scored = sde_step(st.x, v, sig, sig_n, a, prev_sample=x_next, kind=plan.sde_kind, reduction=plan.reduction)
    mean = scored.mean.to(call.store_dtype) if call.store_means else None
    st.stored.append(_Stored(x_in, scored.log_prob.float(), mean, _std_rows(scored.std, st.rows), st.rows))
    st.x = x_next


def _branch(st: _State, factor: int, v: Tensor) -> Tensor:
    """Every current row becomes ``factor`` consecutive rows (leaf order); returns ``v`` for them."""
    idx = torch.arange(st.rows, device=st.x.device).repeat_interleave(factor)
    st.x, st.row_prompt = st.x[idx], st.row_prompt[idx]
    st.ode.expand(idx)
    st.vel.set_rows(st.row_prompt)
    return v[idx]


def _ode_step(st: _State, i: int, v: Tensor, sig: Tensor) -> None:
    """A deterministic head step (``plan.head_solver`` before the span); stored inside the span."""
    call = st.call
    in_span = i in st.span
    x_next = st.ode.step(st.x, v, sig, st.full(st.sigmas[i + 1]), solver=None if in_span else call.plan.head_solver)
    if in_span:
        x_next = _round(x_next, call.store_dtype)
        mean = x_next.to(call.store_dtype) if call.store_means else None
        zeros = torch.zeros(st.rows, device=st.x.device)
        st.stored.append(_Stored(st.x, zeros, mean, torch.zeros(st.rows, device=st.x.device), st.rows))
        if st.tree is not None:
            st.tree.step_nodes.append(None)
    st.x = x_next


def _tails(st: _State) -> list[Tensor]:
    """The ODE continuation after the last SDE step for each granularity, each from the head's
    state and solver history; ``st`` keeps the head's rows."""
    plan, ode = st.call.plan, st.ode
    history = (ode.x0_prev, ode.sigma_prev)
    finals = []
    for g in plan.granularities:
        tail = tail_sigmas(plan, st.sigmas, st.span.stop, g)
        ode.x0_prev, ode.sigma_prev = history
        x = st.x
        for j in range(tail.numel() - 1):
            sig, sig_n = st.full(tail[j]), st.full(tail[j + 1])
            x = ode.step(x, st.vel(x, sig), sig, sig_n)
            st.tick()
        finals.append(x)
    if st.bar is not None:
        st.bar.close()
    return finals


def _assemble(st: _State, finals: list[Tensor]) -> Rollout:
    """Everything on the N final rows (leaf order), per-sample trained subsets drawn last."""
    call, plan = st.call, st.call.plan
    N, device = call.num_rows, st.x.device
    latents, means, log_probs, stds = _stored_tensors(st)
    span_idx = torch.tensor(list(st.span), dtype=torch.long)
    trained = _trained(st, span_idx)
    final_latents = torch.stack([_expand_rows(f, N) for f in finals], dim=1).to(call.store_dtype)
    images, per_gran = _decode(st, finals) if call.decode else (None, None)
    logger.debug("rollout: %s | %d prompts x %d | nfe %d in %d calls", plan.describe(), call.num_prompts,
                 call.group_size, st.vel.nfe, st.vel.calls)
    prompt_index = torch.arange(call.num_prompts, device=device).repeat_interleave(call.group_size)
    return Rollout(
        latents=latents,
        means=means,
        log_probs=log_probs,
        stds=stds,
        sigmas=_per_row(st.sigmas[span_idx], N, device),
        sigma_next=_per_row(st.sigmas[span_idx + 1], N, device),
        noise_levels=_per_row(plan.noise_level[span_idx].float(), N, device),
        stochastic=_per_row(plan.sde[span_idx], N, device),
        trained=trained,
        step_index=span_idx.to(device),
        final_latents=final_latents,
        prompt_index=prompt_index,
        group_id=prompt_index.clone(),
        embeds=dict(st.embeds.tensors()),
        prompts=list(call.prompts),
        images=images,
        images_per_granularity=per_gran,
        granularities=tuple(plan.granularities),
        nfe=st.vel.nfe,
        velocity_calls=st.vel.calls,
        sde_kind=plan.sde_kind,
        reduction=plan.reduction,
        guidance_scale=call.guidance_scale,
        num_steps=plan.num_steps,
        height=call.height,
        width=call.width,
        plan_kind=plan.kind,
        **(st.tree.rollout_fields(N) if st.tree is not None else {}),
    )


def _per_row(values: Tensor, n: int, device: torch.device) -> Tensor:
    """A ``[T]`` per-step tensor as ``[n, T]`` on ``device``."""
    return values.unsqueeze(0).expand(n, values.shape[0]).clone().to(device)


def _stored_tensors(st: _State) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """``latents``, ``means``, ``log_probs`` and ``stds`` of the stored span on the N final rows."""
    call, N, T, device = st.call, st.call.num_rows, len(st.stored), st.x.device
    latent_shape = tuple(st.x.shape[1:])
    latents = torch.empty((N, T + 1, *latent_shape), dtype=call.store_dtype, device=device)
    for t, s in enumerate(st.stored):
        latents[:, t] = _expand_rows(s.x_in, N).to(call.store_dtype)
    latents[:, T] = _expand_rows(st.x, N).to(call.store_dtype)  # T = 0: the initial noise
    means = torch.empty((N, T, *latent_shape), dtype=call.store_dtype, device=device) if call.store_means else None
    log_probs = torch.zeros(N, T, device=device)
    stds = torch.zeros(N, T, device=device)
    for t, s in enumerate(st.stored):
        log_probs[:, t] = _expand_rows(s.log_prob, N)
        stds[:, t] = _expand_rows(s.std, N)
        if means is not None:
            means[:, t] = _expand_rows(s.mean, N)
    return latents, means, log_probs, stds


def _trained(st: _State, span_idx: Tensor) -> Tensor:
    """``[N, T]``: the plan's trained steps, per-sample subsets drawn from the generator, and with
    ``tree_dedup`` a transition shared by several leaves kept on its first leaf only."""
    call, plan, N, device = st.call, st.call.plan, st.call.num_rows, st.x.device
    if plan.subset_size <= 0:
        trained = _per_row(plan.trained[span_idx], N, device)
    elif call.per_prompt:
        trained = torch.cat([plan.trained_mask(call.group_size, g) for g in call.generator])[:, span_idx].to(device)
    else:
        trained = plan.trained_mask(N, call.generator)[:, span_idx].to(device)
    if plan.tree_dedup:
        for t, s in enumerate(st.stored):
            if s.rows < N:  # this transition is shared by N // s.rows leaves: keep it on the first one
                trained[:, t] &= (torch.arange(N, device=device) % (N // s.rows)) == 0
    return trained


def _decode(st: _State, finals: list[Tensor]) -> tuple[Tensor, Tensor]:
    """The images of the first granularity ``[N, 3, H, W]`` and of all ``[N, n_granularities, 3, H, W]``,
    decoded in chunks of ``decode_chunk_size`` (else ``chunk_size``) rows."""
    N, rows = st.call.num_rows, st.rows
    chunk = st.call.decode_chunk_size or st.call.chunk_size or rows
    decoded = []
    for f in finals:
        imgs = torch.cat([st.call.policy.decode(f[a:a + chunk]) for a in range(0, rows, chunk)], dim=0)
        decoded.append(_expand_rows(imgs.float(), N))
    per_gran = torch.stack(decoded, dim=1)
    return per_gran[:, 0], per_gran


def _per_prompt_noise(x: Tensor, generators: Sequence[torch.Generator], num_prompts: int) -> Tensor:
    """Standard normal noise shaped like ``x`` whose rows of prompt p (rows are prompt-major, an
    equal number per prompt) come from ``generators[p]``."""
    per = x.shape[0] // num_prompts
    parts = [torch.randn((per, *x.shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(parts).to(x.device)


# ---- per-prompt group sizes -------------------------------------------------------------------------


def _group_sizes(group_size: Sequence[int], prompts: Sequence[str]) -> list[int]:
    """A list ``group_size`` checked: one int >= 1 per prompt."""
    sizes = list(group_size)
    if len(sizes) != len(prompts) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in sizes):
        raise ValueError(f"group_size: a list needs one int >= 1 per prompt ({len(prompts)}), got {group_size!r}")
    return sizes


def _sample_sizes(call: _Call, sizes: list[int]) -> Rollout:
    """Prompts with different group sizes: one :func:`_sample` per distinct size (in order of first
    appearance) over that size's prompts, their embeddings selected from one encoding of all the
    prompts; then the rows ordered prompt-major as the prompts (``prompt_index`` and ``group_id`` the
    prompt's position in ``call.prompts``, ``nfe`` and ``velocity_calls`` summed)."""
    if not call.per_prompt:
        raise ValueError("generator: per-prompt group sizes need one generator per prompt, so that a prompt's "
                         "samples do not depend on which prompts share its call")
    if call.plan.is_tree or call.plan.sweep:
        raise ValueError("group_size: per-prompt group sizes need a flat plan (no tree, no singular sweep)")
    embeds = _encode_prompts(call)
    parts, members = [], []
    for size in dict.fromkeys(sizes):
        idx = [i for i, g in enumerate(sizes) if g == size]
        sub = replace(call, prompts=[call.prompts[i] for i in idx], group_size=size,
                      generator=[call.generator[i] for i in idx], embeds=embeds.select(idx), images=None)
        parts.append(_sample(sub))
        members.append(idx)
    start = {}  # prompt -> (part, first row in that part)
    for j, idx in enumerate(members):
        for k, i in enumerate(idx):
            start[i] = (j, k * sizes[i])
    offsets = [0]
    for r in parts[:-1]:
        offsets.append(offsets[-1] + r.num_samples)
    order = torch.tensor([offsets[start[i][0]] + start[i][1] + m for i in range(len(sizes)) for m in range(sizes[i])],
                         dtype=torch.long)
    rows = {}
    for name in Rollout._ROW_FIELDS:
        values = [getattr(r, name) for r in parts]
        if all(v is not None for v in values):
            cat = torch.cat(values, dim=0)
            rows[name] = cat[order.to(cat.device)]
    device = parts[0].prompt_index.device
    prompt_index = torch.arange(len(sizes), device=device).repeat_interleave(torch.tensor(sizes, device=device))
    rows.update(prompt_index=prompt_index, group_id=prompt_index.clone())
    return replace(parts[0], **rows, embeds=dict(embeds.tensors()), prompts=list(call.prompts),
                   nfe=sum(r.nfe for r in parts), velocity_calls=sum(r.velocity_calls for r in parts))


# ---- sweeps ----------------------------------------------------------------------------------------


def _sample_sweep(call: _Call) -> Rollout:
    """A sweep (``docs/methods.md``): one singular sampling per branch step k, all from the same
    initial noise (one row per prompt) and prompt embeddings, concatenated prompt-major. (Its cost
    against one shared trunk: ``docs/methods.md``.)"""
    embeds = _encode_prompts(call)
    init = _initial_noise(call, 1)
    steps = call.plan.sde_steps
    generators = _branch_generators(call, len(steps))
    parts = [_sample(replace(call, plan=call.plan.singular_at(k), generator=generators[j], same_noise=True,
                             embeds=embeds, init_noise=init))
             for j, k in enumerate(steps)]
    return _merge_sweep(call, parts)


def _branch_generators(call: _Call, k: int) -> list[Any]:
    """The SDE noise of branch j: a generator per branch (per prompt and branch for a list),
    each seeded by a draw from the caller's generator."""
    if call.per_prompt:
        per_prompt = [[_child_generator(g) for _ in range(k)] for g in call.generator]
        return [[per_prompt[p][j] for p in range(call.num_prompts)] for j in range(k)]
    return [_child_generator(call.generator) for _ in range(k)]


def _child_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator on ``generator``'s device seeded by one 63-bit draw from it."""
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())
    return torch.Generator(device=generator.device).manual_seed(seed)


def _merge_sweep(call: _Call, parts: list[Rollout]) -> Rollout:
    """The K branch rollouts (rows ``p·G + g`` each) as one, rows ``p·K·G + j·G + g``."""
    P, G, K = call.num_prompts, call.group_size, len(parts)
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
    branch = j_idx.repeat_interleave(G).repeat(P)  # j of each row
    rows["group_id"] = rows["prompt_index"] * K + branch
    rows["branch_step"] = torch.tensor(call.plan.sde_steps, dtype=torch.long, device=device)[branch]
    return replace(
        parts[0],
        **rows,
        step_index=torch.full((1,), -1, dtype=torch.long, device=device),
        groups_per_prompt=K,
        nfe=sum(r.nfe for r in parts),
        velocity_calls=sum(r.velocity_calls for r in parts),
        plan_kind=call.plan.kind,
    )
