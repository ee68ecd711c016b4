"""Sampling plans: which denoising steps are stochastic (SDE), which are trained, where trajectories branch.

Every GRPO-family method for flow models is one choice of steps (``kind``) over the same sampler:

* ``full``: Flow-GRPO (arXiv 2505.05470): every step SDE, every step but the last trained.
* ``random_subset``: DanceGRPO (arXiv 2505.07818): every step SDE, a random 60 % of them trained.
* ``window``: MixGRPO (arXiv 2507.21802): SDE + trained inside a window that slides over training,
  ODE outside; with ``ode_solver="dpm2m"`` and ``tail.ratio`` it is MixGRPO-Flash.
* ``random_window``: Flow-GRPO-Fast: a window of SDE steps drawn each iteration, ODE elsewhere.
* ``singular``: G²RPO (arXiv 2510.01982): one SDE step, ODE continuations at several strides.
* ``tree``: TempFlow-GRPO (arXiv 2508.04324), Dynamic-TreeRPO (arXiv 2509.23352): trajectories
  branch into ``tree.branch_factors[d]`` children at depth d.
* ``ode``: every step deterministic, nothing trained by log-prob (the forward-process objectives).

:func:`build_plan` gives the :class:`Plan` (a few ``[num_steps]`` tensors) of one iteration, its random
choices drawn from :func:`plan_generator` ``(seed, iteration)`` (:mod:`flowrl.core.rng`, keys
``"plan", iteration``), the same on every process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, List, Literal, Optional

import torch

from flowrl.core import rng
from flowrl.core.checks import check_number

__all__ = [
    "PLAN_KINDS",
    "SDE_KINDS",
    "SINGULAR_CHOICES",
    "ODE_SOLVERS",
    "WINDOW_SCHEDULES",
    "PlanConfig",
    "SubsetConfig",
    "WindowConfig",
    "TailConfig",
    "SingularConfig",
    "TreeConfig",
    "Plan",
    "build_plan",
    "eval_plan",
    "plan_generator",
    "shift_interval_at",
    "scheduled_window_start",
    "granular_sigmas",
]

PLAN_KINDS = ("full", "random_subset", "window", "random_window", "singular", "tree", "ode")
SDE_KINDS = ("flow_sde", "dance_sde", "cps")
ODE_SOLVERS = ("euler", "heun", "dpm2m")
WINDOW_SCHEDULES = ("progressive", "decay", "exp_decay", "random")

PlanKind = Literal["full", "random_subset", "window", "random_window", "singular", "tree", "ode"]
SdeKind = Literal["flow_sde", "dance_sde", "cps"]
OdeSolver = Literal["euler", "heun", "dpm2m"]
WindowSchedule = Literal["progressive", "decay", "exp_decay", "random"]
SingularChoice = Literal["random", "cycle", "all"]
SINGULAR_CHOICES = ("random", "cycle", "all")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _at_least(name: str, value: Optional[int], low: int, extra: str = "") -> None:
    """``ValueError("<name>: must be >= low")`` unless ``value`` is None or >= ``low``."""
    if value is not None and value < low:
        raise ValueError(f"{name}: must be >= {low}{extra}, got {value}")


def _check_step_list(name: str, steps: Optional[List[int]]) -> None:
    """A step list (or null): non-empty, steps >= 0 and distinct."""
    if steps is None:
        return
    if len(steps) == 0:
        raise ValueError(f"{name}: must list at least one step (or be null)")
    if any(s < 0 for s in steps):
        raise ValueError(f"{name}: steps must be >= 0, got {list(steps)}")
    if len(set(steps)) != len(steps):
        raise ValueError(f"{name}: steps must be distinct, got {list(steps)}")


@dataclass
class SubsetConfig:
    """``random_subset`` (DanceGRPO): which of the trainable steps are trained."""

    fraction: float = 0.6  # fraction of trainable steps trained (DanceGRPO 0.6)
    per_sample: bool = True  # one subset per sample (DanceGRPO), else one per iteration

    def validate(self) -> None:
        if not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"fraction: must be in (0, 1], got {self.fraction}")


@dataclass
class WindowConfig:
    """The window of SDE (trained) steps: ``window``, ``random_window``, and a tree's sliding window."""

    size: int = 4  # window / random_window: number of consecutive SDE (trained) steps
    start: int = 0  # window / tree: window start at iteration 0 and after a roll-back
    stride: int = 1  # window / tree: steps the window moves per shift (0: frozen, MixGRPO-Flash*)
    shift_interval: int = 25  # window / tree: iterations between shifts (MixGRPO tau)
    schedule: WindowSchedule = "progressive"  # window / tree: progressive | decay | exp_decay | random
    roll_back: bool = True  # window / tree: past the last start go back to start (else stay)
    min_shift_interval: Optional[int] = None  # decay: tau at the last start (null: 1, MixGRPO's --min_iters_per_group)
    exp_k: float = 0.1  # exp_decay: tau(t) = ceil(shift_interval * exp(-exp_k * relu(t - exp_threshold)))
    exp_threshold: int = 13  # exp_decay: start step after which tau decays
    range: Optional[List[int]] = None  # random_window: [lo, hi) holding the window (null: [0, num_steps // 2))

    def validate(self) -> None:
        if self.schedule not in WINDOW_SCHEDULES:
            raise ValueError(f"schedule: unknown window schedule {self.schedule!r}; choose one of {', '.join(WINDOW_SCHEDULES)}")
        _at_least("size", self.size, 1)
        _at_least("start", self.start, 0)
        _at_least("stride", self.stride, 0, " (0 freezes the window)")
        _at_least("shift_interval", self.shift_interval, 1, " iteration")
        _at_least("min_shift_interval", self.min_shift_interval, 1, " or null")
        if not (self.exp_k >= 0 and math.isfinite(self.exp_k)):
            raise ValueError(f"exp_k: must be a finite number >= 0, got {self.exp_k}")
        _at_least("exp_threshold", self.exp_threshold, 0)
        if self.range is not None:
            if len(self.range) != 2:
                raise ValueError(f"range: must be [lo, hi], got {list(self.range)}")
            lo, hi = self.range
            if lo < 0 or hi <= lo:
                raise ValueError(f"range: need 0 <= lo < hi, got {list(self.range)}")
            if hi - lo < self.size:
                raise ValueError(f"range: [{lo}, {hi}) is shorter than size={self.size}")


@dataclass
class TailConfig:
    """The ODE tail after the last SDE step, re-discretised to fewer steps (MixGRPO-Flash)."""

    ratio: Optional[float] = None  # ODE tail after the last SDE step re-discretised to ratio*n steps (Flash 0.4; null: off)
    shift: float = 3.0  # time shift spacing the compressed tail (MixGRPO-Flash uses its schedule's 3.0; 1 = uniform sigma)

    def validate(self) -> None:
        if self.ratio is not None and not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio: must be in (0, 1] or null, got {self.ratio}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift: must be a finite number > 0, got {self.shift}")


@dataclass
class SingularConfig:
    """``singular`` (G²RPO): the one SDE step, and how a sweep over all of them is split."""

    steps: Optional[List[int]] = None  # eligible steps (null: [0, num_steps // 2))
    choice: SingularChoice = "random"  # draw the step, cycle by iteration, or all (a sweep: every eligible step each iteration)
    sweep_split: Literal["branch", "prompt"] = "branch"  # sweep: minibatches of whole branch steps (G2RPO) or of whole prompts (TempFlow-GRPO)

    def validate(self) -> None:
        if self.choice not in SINGULAR_CHOICES:
            raise ValueError(f"choice: must be 'random', 'cycle' or 'all', got {self.choice!r}")
        if self.sweep_split not in ("branch", "prompt"):
            raise ValueError(f"sweep_split: must be 'branch' or 'prompt', got {self.sweep_split!r}")
        _check_step_list("steps", self.steps)


@dataclass
class TreeConfig:
    """``tree`` (TempFlow-GRPO, Dynamic-TreeRPO): where and how trajectories branch."""

    branch_factors: List[int] = field(default_factory=lambda: [2, 2])  # children per node at each depth
    branch_steps: Optional[List[int]] = None  # branching steps (TempFlow); null: sliding window (Dynamic-TreeRPO, plan.window)
    branch_noise: Optional[List[float]] = None  # noise level per depth (null: plan.noise_level everywhere)
    dedup: bool = True  # train a transition shared by several leaves once, on its first leaf

    def validate(self) -> None:
        if len(self.branch_factors) == 0:
            raise ValueError("branch_factors: a tree needs at least one depth")
        if any(b < 1 for b in self.branch_factors):
            raise ValueError(f"branch_factors: every factor must be >= 1, got {list(self.branch_factors)}")
        if self.branch_steps is not None:
            if len(self.branch_steps) != len(self.branch_factors):
                raise ValueError(f"branch_steps: {len(self.branch_steps)} steps for "
                                 f"{len(self.branch_factors)} branch_factors; give one step per depth")
            if any(s < 0 for s in self.branch_steps):
                raise ValueError(f"branch_steps: steps must be >= 0, got {list(self.branch_steps)}")
            if any(b <= a for a, b in zip(self.branch_steps, self.branch_steps[1:])):
                raise ValueError(f"branch_steps: must be strictly increasing, got {list(self.branch_steps)}")
        if self.branch_noise is not None and len(self.branch_noise) != len(self.branch_factors):
            raise ValueError(f"branch_noise: {len(self.branch_noise)} levels for "
                             f"{len(self.branch_factors)} depths; give one per depth")


_SECTIONS = ("subset", "window", "tail", "singular", "tree")


@dataclass
class PlanConfig:
    """Which steps of a training rollout are stochastic, trained or branching (see module doc).

    The settings of each kind live in their own section (``subset``, ``window``, ``tail``,
    ``singular``, ``tree``), each validating its own fields. ``validate`` checks them and everything
    else that can be checked without the number of steps; given the number of steps (an ``int``, or
    the run config whose ``sample.num_steps`` holds it) it also checks windows, ranges and step
    lists against the trajectory.
    """

    kind: PlanKind = "full"  # full | random_subset | window | random_window | singular | tree | ode
    noise_level: float = 0.7  # SDE noise level a (Flow-GRPO 0.7, CPS 0.8, DanceGRPO eta 0.3)
    sde: SdeKind = "flow_sde"  # dynamics of stochastic steps: flow_sde | dance_sde | cps
    reduction: Literal["mean", "sum"] = "mean"  # log-prob reduction over latent elements
    train_last_step: bool = False  # also train the last, near-clean step (Flow-GRPO never does)
    ode_solver: OdeSolver = "euler"  # solver of deterministic steps: euler | heun | dpm2m
    head_solver: Optional[OdeSolver] = None  # solver of the ODE steps before the first SDE step (null: ode_solver; MixGRPO-Flash: euler)
    granularities: List[int] = field(default_factory=lambda: [1])  # ODE continuation strides after the last SDE step (G²RPO [1, 2])
    step_weighting: Literal["none", "noise_aware"] = "none"  # per-step loss weights of trained steps (TempFlow-GRPO noise-aware: the step's std s_t)
    step_weight_scale: Optional[float] = None  # noise_aware: absolute weights scale * s_t (TempFlow-GRPO code 2.25); null: s_t / mean s over the minibatch's trained steps
    subset: SubsetConfig = field(default_factory=SubsetConfig)  # random_subset: the trained subset
    window: WindowConfig = field(default_factory=WindowConfig)  # window / random_window / tree: the window and its schedule
    tail: TailConfig = field(default_factory=TailConfig)  # the ODE tail's re-discretisation (MixGRPO-Flash)
    singular: SingularConfig = field(default_factory=SingularConfig)  # singular: the SDE step and sweeps
    tree: TreeConfig = field(default_factory=TreeConfig)  # tree: branching

    # ---------------------------------------------------------------------------------------------

    def validate(self, num_steps: Any = None) -> None:
        """Raise ``ValueError("<field>: <reason>")`` for impossible settings (a section's field
        as ``section.field``).

        ``num_steps``: the rollout's number of denoising steps, or a run config (anything with
        ``.sample.num_steps``, which is how :func:`flowrl.config.validate` calls it), or None to
        check only what does not depend on it.
        """
        if num_steps is not None and not isinstance(num_steps, int):
            num_steps = getattr(getattr(num_steps, "sample", None), "num_steps", None)
        for name in _SECTIONS:
            try:
                getattr(self, name).validate()
            except ValueError as e:
                raise ValueError(f"{name}.{e}") from None
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"kind: unknown plan kind {self.kind!r}; choose one of {', '.join(PLAN_KINDS)}")
        if self.sde not in SDE_KINDS:
            raise ValueError(f"sde: unknown SDE kind {self.sde!r}; choose one of {', '.join(SDE_KINDS)}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction: must be 'mean' or 'sum', got {self.reduction!r}")
        for name in ("ode_solver", "head_solver"):
            solver = getattr(self, name)
            if solver is not None and solver not in ODE_SOLVERS:
                raise ValueError(f"{name}: unknown solver {solver!r}; choose one of {', '.join(ODE_SOLVERS)}")
        _check_noise("noise_level", self.noise_level, self.sde)
        if len(self.granularities) == 0:
            raise ValueError("granularities: must hold at least one stride (use [1] for the plain trajectory)")
        if any(g < 1 for g in self.granularities):
            raise ValueError(f"granularities: every stride must be >= 1, got {list(self.granularities)}")
        if len(set(self.granularities)) != len(self.granularities):
            raise ValueError(f"granularities: strides must be distinct, got {list(self.granularities)}")
        if self.tail.ratio is not None and list(self.granularities) != [1]:
            raise ValueError("tail.ratio: cannot be combined with granularities other than [1]; "
                             "both re-discretise the ODE tail")
        for a in self.tree.branch_noise or ():
            _check_noise("tree.branch_noise", a, self.sde)
        if self.step_weight_scale is not None:
            if self.step_weighting != "noise_aware":
                raise ValueError("step_weight_scale: only used with step_weighting: noise_aware (set it, or leave the scale null)")
            check_number("step_weight_scale", self.step_weight_scale, gt=0, none_ok=True)
        if num_steps is not None:
            self._check_steps(num_steps)

    def _check_steps(self, num_steps: int) -> None:
        """The checks of :meth:`validate` that need the trajectory's number of steps."""
        if num_steps < 1:
            raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
        limit = self.trainable_limit(num_steps)
        if limit < 1:
            raise ValueError(f"train_last_step: with num_steps={num_steps} and train_last_step=False "
                             "no step can be trained (need num_steps >= 2)")
        w = self.window
        if self.kind == "random_window" and w.size > limit:
            raise ValueError(f"window.size: {w.size} steps do not fit in the {limit} trainable steps "
                             f"of a {num_steps}-step trajectory")
        if self.kind == "window":
            cap = limit - 1  # MixGRPO cuts its window at its last start, max_timesteps = limit - 1
            if w.size > cap:
                raise ValueError(f"window.size: {w.size} steps do not fit before step {cap}, where a "
                                 f"{num_steps}-step trajectory's window ends (num_steps - 2 without train_last_step)")
            if w.start > cap - 1:
                raise ValueError(f"window.start: {w.start} trains no step; the last start that "
                                 f"trains one is {cap - 1} (windows end before step {cap})")
            if w.schedule == "random" and w.start > cap - w.size:
                raise ValueError(f"window.start: the random schedule starts at most at {cap - w.size}, "
                                 f"got {w.start}")
        if self.kind == "random_window":
            lo, hi = self.random_window_range(num_steps)
            if hi > limit:
                raise ValueError(f"window.range: hi={hi} exceeds the {limit} trainable steps "
                                 f"(num_steps={num_steps}, train_last_step={self.train_last_step})")
            if hi - lo < w.size:
                raise ValueError(f"window.size: {w.size} steps do not fit in window.range [{lo}, {hi})")
        if self.kind == "singular":
            steps = self.singular_eligible(num_steps)
            if len(steps) == 0:
                raise ValueError(f"singular.steps: no eligible step for num_steps={num_steps}")
            bad = [s for s in steps if s >= limit]
            if bad:
                raise ValueError(f"singular.steps: {bad} not trainable (trainable steps are 0..{limit - 1})")
        if self.kind == "tree":
            depth = len(self.tree.branch_factors)
            if self.tree.branch_steps is not None:
                bad = [s for s in self.tree.branch_steps if s >= limit]
                if bad:
                    raise ValueError(f"tree.branch_steps: {bad} not trainable (trainable steps are 0..{limit - 1})")
            else:
                if depth > limit:
                    raise ValueError(f"tree.branch_factors: a {depth}-deep tree window does not fit in the "
                                     f"{limit} trainable steps")
                if w.start > limit - depth:
                    raise ValueError(f"window.start: {w.start} leaves no room for a {depth}-deep "
                                     f"tree before step {limit}")

    # Derived quantities used by build_plan (public so tests and docs can name them) ---------------

    def trainable_limit(self, num_steps: int) -> int:
        """Trainable steps are ``0 .. limit-1``: ``num_steps`` with ``train_last_step``, else ``num_steps - 1``."""
        return num_steps if self.train_last_step else num_steps - 1

    def random_window_range(self, num_steps: int) -> tuple[int, int]:
        """``[lo, hi)`` of Flow-GRPO-Fast's window: ``window.range`` or ``[0, num_steps // 2)``."""
        if self.window.range is not None:
            return int(self.window.range[0]), int(self.window.range[1])
        return 0, num_steps // 2

    @property
    def is_sweep(self) -> bool:
        """A singular sweep: every eligible step branches in each iteration (``singular.choice="all"``)."""
        return self.kind == "singular" and self.singular.choice == "all"

    def groups_per_prompt(self, num_steps: int) -> int:
        """Advantage groups per prompt in one rollout: K = the number of eligible steps for a sweep
        (one group per (prompt, branch step)), else 1."""
        return len(self.singular_eligible(num_steps)) if self.is_sweep else 1

    def singular_eligible(self, num_steps: int) -> list[int]:
        """Steps the singular SDE step is chosen from: ``singular.steps`` or ``[0, max(1, num_steps // 2))``
        (G²RPO perturbs steps 0..7 of 16)."""
        if self.singular.steps is not None:
            return sorted(int(s) for s in self.singular.steps)
        return list(range(max(1, num_steps // 2)))


def _check_noise(name: str, a: float, sde: str) -> None:
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
        raise ValueError(f"{name}: must be a finite number > 0 (use an all-ODE plan for no noise), got {a!r}")
    if sde == "cps" and a > 1:
        raise ValueError(f"{name}: CPS needs 0 < noise_level <= 1 (s = sigma_next*sin(a*pi/2)), got {a}")


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Per-step choices for one rollout of ``num_steps`` steps (plain tensors, CPU).

    ``sde[i]``: step i is stochastic (its transition has a log-prob); ``noise_level[i]``: its noise
    level (0 on ODE steps); ``trained[i]``: step i is trained (always a subset of ``sde``);
    ``branch[i]``: number of children each node gets at step i (1 = no branching; >1 only on SDE
    steps of tree plans); ``subset_size`` > 0: each sample trains only ``subset_size`` steps drawn
    among ``trained`` (see :meth:`trained_mask`); ``granularities``: the ODE continuations run after
    the last SDE step (the first one is the main trajectory); ``compress_ratio``: re-discretise that
    ODE tail (MixGRPO-Flash; spaced with time shift ``compress_shift``, see
    :func:`flowrl.flow.steps.compressed_sigmas`); ``ode_solver``: the solver of deterministic steps,
    ``head_solver`` the one of those before the first SDE step (None: ``ode_solver``).

    ``sweep`` (singular sweeps, ``singular.choice="all"``): ``sde``/``trained`` mark every branch
    step k, but no trajectory takes more than one of them: the sampler runs, per k, the singular
    plan :meth:`singular_at` ``(k)`` from the prompt's shared ODE trunk (see
    :mod:`flowrl.flow.sampler`).
    """

    kind: str
    num_steps: int
    sde: torch.Tensor  # [S] bool
    noise_level: torch.Tensor  # [S] float32, 0 where the step is ODE
    trained: torch.Tensor  # [S] bool
    branch: torch.Tensor  # [S] int64, 1 = no branching
    sde_kind: str = "flow_sde"
    reduction: str = "mean"
    ode_solver: str = "euler"
    head_solver: Optional[str] = None
    compress_ratio: Optional[float] = None
    compress_shift: float = 3.0
    granularities: tuple[int, ...] = (1,)
    subset_size: int = 0
    tree_dedup: bool = True
    iteration: int = 0
    sweep: bool = False

    @property
    def is_tree(self) -> bool:
        return self.kind == "tree"

    def singular_at(self, step: int) -> "Plan":
        """The singular plan of one branch of a sweep: SDE + trained at ``step`` only (one of
        ``sde_steps``), ODE elsewhere, every other choice (dynamics, solvers, granularities) kept."""
        if not bool(self.sde[step]):
            raise ValueError(f"step: {step} is not a stochastic step of this plan (sde steps {self.sde_steps})")
        only = torch.zeros_like(self.sde)
        only[step] = True
        noise = torch.zeros_like(self.noise_level)
        noise[step] = self.noise_level[step]
        return replace(self, kind="singular", sde=only, trained=only & self.trained, noise_level=noise, sweep=False)

    @property
    def sde_steps(self) -> list[int]:
        return torch.nonzero(self.sde).flatten().tolist()

    @property
    def trained_steps(self) -> list[int]:
        return torch.nonzero(self.trained).flatten().tolist()

    @property
    def first_sde(self) -> Optional[int]:
        """The first stochastic step (None when there is none): where the sampler's rows multiply first."""
        s = self.sde_steps
        return s[0] if s else None

    @property
    def leaves(self) -> int:
        """Leaves of one tree: the product of the branch factors (1 when nothing branches)."""
        return int(torch.prod(self.branch).item())

    @property
    def depth(self) -> int:
        """Number of stochastic steps (the length of a leaf's node path in a tree)."""
        return int(self.sde.sum().item())

    def trained_mask(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``[num_samples, S]`` bool: which steps each sample trains.

        Without a per-sample subset every row is ``trained``. With ``subset_size = k`` (DanceGRPO,
        arXiv 2505.07818: each sample trains the first ``int(T·fraction)`` entries of its own random
        permutation of the T trainable steps) each row gets its own k-subset of ``trained``, drawn
        from ``generator`` (one ``randperm`` per row, in row order).
        """
        base = self.trained.unsqueeze(0).expand(num_samples, -1).clone()
        if self.subset_size <= 0:
            return base
        eligible = torch.nonzero(self.trained).flatten()
        out = torch.zeros(num_samples, self.num_steps, dtype=torch.bool)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        for r in range(num_samples):
            perm = torch.randperm(eligible.numel(), generator=generator, device=gen_device).cpu()
            pick = eligible[perm[: self.subset_size]]
            out[r, pick] = True
        return out

    def describe(self) -> str:
        """One line for logs, e.g. ``window sde=[3,4,5] trained=[3,4,5] flow_sde a=0.7``."""
        parts = [self.kind, f"steps={self.num_steps}", f"sde={self.sde_steps}", f"trained={self.trained_steps}"]
        if self.sweep:
            parts.append("sweep (one branch per step)")
        if self.subset_size:
            parts.append(f"per-sample subset of {self.subset_size}")
        if self.is_tree:
            parts.append(f"branch={[int(b) for b in self.branch[self.sde].tolist()]}")
        if self.sde_steps:
            levels = sorted({round(float(a), 6) for a in self.noise_level[self.sde].tolist()})
            parts.append(f"{self.sde_kind} a={levels if len(levels) > 1 else levels[0]}")
        if self.ode_solver != "euler":
            parts.append(f"ode={self.ode_solver}")
        if self.head_solver not in (None, self.ode_solver):
            parts.append(f"head={self.head_solver}")
        if self.compress_ratio is not None:
            parts.append(f"compress={self.compress_ratio}")
        if self.granularities != (1,):
            parts.append(f"granularities={list(self.granularities)}")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Random numbers that every process agrees on
# --------------------------------------------------------------------------------------------------

def plan_generator(seed: int, iteration: int) -> torch.Generator:
    """``flowrl.core.rng.generator(seed, "plan", iteration)``: a CPU generator that depends on
    ``(seed, iteration)`` only, so it is the same on every process. Pass it to :func:`build_plan`;
    never use a process-specific RNG for plan choices, or group members on different GPUs would
    use different windows.
    """
    if iteration < 0:
        raise ValueError(f"iteration: must be >= 0, got {iteration}")
    return rng.generator(seed, "plan", iteration)


def _randint(low: int, high_inclusive: int, generator: Optional[torch.Generator]) -> int:
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=generator).item())


# --------------------------------------------------------------------------------------------------
# MixGRPO's window scheduler (pure functions of the iteration)
# --------------------------------------------------------------------------------------------------


def shift_interval_at(
    start: int,
    *,
    schedule: str,
    shift_interval: int,
    max_start: int,
    min_shift_interval: Optional[int] = None,
    exp_k: float = 0.1,
    exp_threshold: int = 13,
) -> int:
    """Iterations the window stays at ``start`` before it moves (MixGRPO, arXiv 2507.21802).

    * ``progressive``: constant tau = ``shift_interval``.
    * ``decay``: linear from tau_max = ``shift_interval`` at step 0 to tau_min =
      ``min_shift_interval`` (default 1) at ``max_start``:
      tau(t) = max(tau_min, floor(tau_max·(1 − t/max_start) + tau_min·t/max_start)). (MixGRPO's
      decay reads tau_max from ``--max_iters_per_group``, default 10, not ``--iters_per_group``.)
    * ``exp_decay``: tau(t) = ceil(tau0·exp(−k·ReLU(t − threshold))), k = 0.1, threshold 13.
    """
    if schedule in ("progressive", "random"):
        return shift_interval
    if schedule == "decay":
        tau_min = min_shift_interval if min_shift_interval is not None else 1
        progress = start / max_start if max_start > 0 else 0.0
        return max(tau_min, int(shift_interval * (1 - progress) + tau_min * progress))
    if schedule == "exp_decay":
        return max(1, math.ceil(shift_interval * math.exp(-exp_k * max(0, start - exp_threshold))))
    raise ValueError(f"schedule: unknown window schedule {schedule!r}")


def scheduled_window_start(
    iteration: int,
    *,
    max_start: int,
    stride: int,
    shift_interval: int,
    schedule: str = "progressive",
    roll_back: bool = True,
    first: int = 0,
    min_shift_interval: Optional[int] = None,
    exp_k: float = 0.1,
    exp_threshold: int = 13,
    last_start: Optional[int] = None,
) -> int:
    """Window start at training ``iteration`` (0-based) for MixGRPO's deterministic schedules.

    The window starts at ``first``; after it has been used for tau(start) iterations
    (:func:`shift_interval_at`, whose ``decay`` measures progress against ``max_start``) it moves by
    ``stride`` steps (0 = frozen). A start beyond ``last_start`` (default ``max_start``) rolls back
    to ``first`` (``roll_back``), or stays at ``last_start``. This equals stepping MixGRPO's state
    machine ``iteration`` times (read start, then update), computed over whole stays instead of
    single iterations: O(number of distinct starts), not O(iteration).
    """
    if iteration < 0:
        raise ValueError(f"iteration: must be >= 0, got {iteration}")
    if schedule == "random":
        raise ValueError("schedule: 'random' draws its start from a generator; see build_plan")
    last = max_start if last_start is None else min(last_start, max_start)
    if first >= last:
        return last
    if stride == 0:
        return first

    def tau(s: int) -> int:
        return shift_interval_at(s, schedule=schedule, shift_interval=shift_interval, max_start=max_start,
                                 min_shift_interval=min_shift_interval, exp_k=exp_k, exp_threshold=exp_threshold)

    starts = list(range(first, last + 1, stride))  # the positions of one pass
    stays = [tau(s) for s in starts]
    remaining = iteration
    if roll_back:
        remaining %= sum(stays)
    for s, n in zip(starts, stays):
        if remaining < n:
            return s
        remaining -= n
    return last  # no roll-back: clipped at the last start for good


# --------------------------------------------------------------------------------------------------
# build_plan
# --------------------------------------------------------------------------------------------------


def _window_start(cfg: WindowConfig, iteration: int, max_start: int, generator: Optional[torch.Generator],
                  last_start: Optional[int] = None) -> int:
    """``random``: ``start`` at iteration 0 (MixGRPO reads its window before its first update),
    then uniform in ``[0, max_start]``; otherwise :func:`scheduled_window_start`."""
    if cfg.schedule == "random":
        return cfg.start if iteration == 0 else _randint(0, max_start, generator)
    return scheduled_window_start(
        iteration,
        max_start=max_start,
        stride=cfg.stride,
        shift_interval=cfg.shift_interval,
        schedule=cfg.schedule,
        roll_back=cfg.roll_back,
        first=cfg.start,
        min_shift_interval=cfg.min_shift_interval,
        exp_k=cfg.exp_k,
        exp_threshold=cfg.exp_threshold,
        last_start=last_start,
    )


@dataclass
class _Steps:
    """One plan kind's choice of steps: ``sde`` and ``trained`` masks ``[S]``; for a per-sample
    subset its size; for a tree the branch factors and the noise level of each step."""

    sde: torch.Tensor
    trained: torch.Tensor
    subset_size: int = 0
    branch: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None


def _mask(num_steps: int, index: Any) -> torch.Tensor:
    """``[num_steps]`` bool, True at ``index`` (a slice, a list of steps or an index tensor)."""
    out = torch.zeros(num_steps, dtype=torch.bool)
    out[index] = True
    return out


def _sde_and_trained(num_steps: int, index: Any) -> _Steps:
    """The same steps stochastic and trained, ODE elsewhere."""
    sde = _mask(num_steps, index)
    return _Steps(sde, sde.clone())


def _full_steps(cfg: PlanConfig, S: int, iteration: int, generator: Optional[torch.Generator]) -> _Steps:
    """Flow-GRPO (arXiv 2505.05470): all S steps SDE, the trainable steps ``0..L-1`` trained
    (L = S, or S − 1 without ``train_last_step``; Flow-GRPO's ``timestep_fraction`` 0.99)."""
    return _Steps(_mask(S, slice(None)), _mask(S, slice(0, cfg.trainable_limit(S))))


def _random_subset_steps(cfg: PlanConfig, S: int, iteration: int, generator: Optional[torch.Generator]) -> _Steps:
    """DanceGRPO (arXiv 2505.07818): all steps SDE; k = max(1, int(L·fraction)) of the L trainable
    steps trained, per sample (``subset.per_sample``: :meth:`Plan.trained_mask` draws them) or one
    subset for the iteration, drawn from ``generator``."""
    L = cfg.trainable_limit(S)
    k = max(1, int(L * cfg.subset.fraction))
    if cfg.subset.per_sample:
        return _Steps(_mask(S, slice(None)), _mask(S, slice(0, L)), subset_size=k if k < L else 0)
    return _Steps(_mask(S, slice(None)), _mask(S, torch.randperm(L, generator=generator)[:k]))


def _window_steps(cfg: PlanConfig, S: int, iteration: int, generator: Optional[torch.Generator]) -> _Steps:
    """MixGRPO (arXiv 2507.21802): SDE + trained on ``[t, min(t + size, M))`` with M = L − 1 (= S − 2,
    MixGRPO's ``max_timesteps``, which both caps the window and bounds its start), t from MixGRPO's
    schedule over the starts ``0 .. M − 1`` (``decay`` measures progress against M); ``random``:
    ``window.start`` at iteration 0, then t uniform in ``[0, M − size]``. (MixGRPO's own start M has
    an empty window, on which its loop raises: flowrl rolls back after M − 1 instead.) With
    ``ode_solver="dpm2m"`` and ``tail.ratio`` this is MixGRPO-Flash."""
    cap, size = cfg.trainable_limit(S) - 1, cfg.window.size  # cap: MixGRPO's max_timesteps
    if cfg.window.schedule == "random":
        start = _window_start(cfg.window, iteration, cap - size, generator)
    else:
        start = _window_start(cfg.window, iteration, cap, generator, last_start=cap - 1)
    return _sde_and_trained(S, slice(start, min(start + size, cap)))


def _random_window_steps(cfg: PlanConfig, S: int, iteration: int, generator: Optional[torch.Generator]) -> _Steps:
    """Flow-GRPO-Fast: t uniform in ``[lo, hi − size]`` of ``window.range`` (default ``[0, S // 2)``),
    SDE + trained on ``[t, t + size)``."""
    lo, hi = cfg.random_window_range(S)
    start = _randint(lo, hi - cfg.window.size, generator)
    return _sde_and_trained(S, slice(start, start + cfg.window.size))


def _singular_steps(cfg: PlanConfig, S: int, iteration: int, generator: Optional[torch.Generator]) -> _Steps:
    """G²RPO (arXiv 2510.01982): one SDE + trained step, drawn from the eligible steps (``random``)
    or ``eligible[iteration % len]`` (``cycle``); ``all``: every eligible step marked, a sweep (each
    trajectory still takes one of them: see :meth:`Plan.singular_at`)."""
    eligible = cfg.singular_eligible(S)
    if cfg.singular.choice == "all":
        return _sde_and_trained(S, eligible)
    if cfg.singular.choice == "cycle":
        return _sde_and_trained(S, [eligible[iteration % len(eligible)]])
    return _sde_and_trained(S, [eligible[_randint(0, len(eligible) - 1, generator)]])


def _tree_steps(cfg: PlanConfig, S: int, iteration: int, generator: Optional[torch.Generator]) -> _Steps:
    """TempFlow-GRPO (arXiv 2508.04324) and Dynamic-TreeRPO (arXiv 2509.23352): SDE + trained +
    branching into ``tree.branch_factors[d]`` children at depth d, at ``tree.branch_steps`` (TempFlow)
    or at a window of ``depth`` consecutive steps that slides like ``window`` (last start L − depth;
    Dynamic-TreeRPO); noise level ``tree.branch_noise[d]`` at depth d (else ``noise_level``)."""
    tree, depth = cfg.tree, len(cfg.tree.branch_factors)
    if tree.branch_steps is not None:
        steps = [int(s) for s in tree.branch_steps]
    else:
        start = _window_start(cfg.window, iteration, cfg.trainable_limit(S) - depth, generator)
        steps = list(range(start, start + depth))
    levels = tree.branch_noise if tree.branch_noise is not None else [cfg.noise_level] * depth
    out = _sde_and_trained(S, steps)
    out.branch, out.noise = torch.ones(S, dtype=torch.int64), torch.zeros(S, dtype=torch.float32)
    for d, s in enumerate(steps):
        out.branch[s] = int(tree.branch_factors[d])
        out.noise[s] = float(levels[d])
    return out


def _ode_steps(cfg: PlanConfig, S: int, iteration: int, generator: Optional[torch.Generator]) -> _Steps:
    """Every step deterministic (``ode_solver``), nothing trained by log-prob: the rollouts of the
    forward-process objectives (DiffusionNFT, AWM, DGPO, DPO: :mod:`flowrl.core.objectives`)."""
    return _Steps(_mask(S, []), _mask(S, []))


_KIND_STEPS = {"ode": _ode_steps, "full": _full_steps, "random_subset": _random_subset_steps, "window": _window_steps,
               "random_window": _random_window_steps, "singular": _singular_steps, "tree": _tree_steps}


def _noise_levels(cfg: PlanConfig, steps: _Steps) -> torch.Tensor:
    """``[S]`` float32: the kind's own levels (a tree's per depth), else ``noise_level`` on SDE steps, 0 on ODE steps."""
    if steps.noise is not None:
        return steps.noise
    noise = torch.zeros(steps.sde.numel(), dtype=torch.float32)
    noise[steps.sde] = float(cfg.noise_level)
    return noise


def _tail_fields(cfg: PlanConfig) -> dict:
    """The ODE continuation after the last SDE step: MixGRPO-Flash's compressed tail (``tail.ratio``,
    spaced with time shift ``tail.shift``) and G²RPO's ``granularities`` (continuation strides)."""
    return dict(compress_ratio=cfg.tail.ratio, compress_shift=cfg.tail.shift,
                granularities=tuple(int(g) for g in cfg.granularities))


def build_plan(
    cfg: PlanConfig,
    num_steps: int,
    iteration: int = 0,
    generator: Optional[torch.Generator] = None,
) -> Plan:
    """The plan of training ``iteration`` for a ``num_steps``-step rollout: the steps chosen by the
    function of ``cfg.kind`` (``_full_steps`` .. ``_tree_steps``, each naming its paper), their noise
    levels, and the ODE tail.

    ``generator``: every random choice (random window position, singular step, shared trained
    subset) is drawn from it; pass ``plan_generator(seed, iteration)`` so that every process builds
    the same plan. A deterministic kind ignores it.
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool):
        raise ValueError(f"num_steps: must be an int, got {num_steps!r}")
    if iteration < 0:
        raise ValueError(f"iteration: must be >= 0, got {iteration}")
    cfg.validate(num_steps)
    steps = _KIND_STEPS[cfg.kind](cfg, num_steps, iteration, generator)
    return Plan(
        kind=cfg.kind,
        num_steps=num_steps,
        sde=steps.sde,
        noise_level=_noise_levels(cfg, steps),
        trained=steps.trained,
        branch=steps.branch if steps.branch is not None else torch.ones(num_steps, dtype=torch.int64),
        sde_kind=cfg.sde,
        reduction=cfg.reduction,
        ode_solver=cfg.ode_solver,
        head_solver=cfg.head_solver,
        subset_size=steps.subset_size,
        tree_dedup=cfg.tree.dedup,
        iteration=iteration,
        sweep=cfg.is_sweep,
        **_tail_fields(cfg),
    )


def eval_plan(num_steps: int, ode_solver: str = "euler") -> Plan:
    """An all-ODE plan of ``num_steps`` steps (evaluation; Flow-GRPO's "denoising reduction" trains
    with fewer steps, e.g. 10, than it evaluates with, e.g. 40)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be an int >= 1, got {num_steps!r}")
    if ode_solver not in ODE_SOLVERS:
        raise ValueError(f"ode_solver: unknown solver {ode_solver!r}; choose one of {', '.join(ODE_SOLVERS)}")
    S = num_steps
    return Plan(
        kind="ode",
        num_steps=S,
        sde=torch.zeros(S, dtype=torch.bool),
        noise_level=torch.zeros(S, dtype=torch.float32),
        trained=torch.zeros(S, dtype=torch.bool),
        branch=torch.ones(S, dtype=torch.int64),
        ode_solver=ode_solver,
    )


# --------------------------------------------------------------------------------------------------
# Sigma sub-schedules for the ODE tail
# --------------------------------------------------------------------------------------------------


def granular_sigmas(tail: torch.Tensor, granularity: int) -> torch.Tensor:
    """The sigmas visited by a continuation of stride ``granularity`` (G²RPO, arXiv 2510.01982).

    ``tail = sigmas[k+1:]`` starts at the state after the last stochastic step k and ends at 0.
    G²RPO visits ``sigmas[:k+2] + sigmas[k+2::g]``: one fine step to ``sigmas[k+2]``, then every
    g-th sigma, and decodes the x0 prediction ``x - sigma v`` taken at the second-to-last kept
    sigma: the last kept sigma is never evaluated, and when the stride skips 0 the continuation
    jumps to 0 from the point before it. An Euler step to 0 is that x0 prediction, so this returns
    ``[tail[0]] + tail[1::g]`` with its last entry replaced by the final sigma.
    """
    if granularity < 1:
        raise ValueError(f"granularity: must be >= 1, got {granularity}")
    if tail.numel() <= 2 or granularity == 1:
        return tail
    out = torch.cat([tail[:1], tail[1::granularity]])
    out[-1] = tail[-1]
    return out

