"""The flow GRPO update: recompute the log-prob of every trained step with grad, apply the loss core.

One call of :meth:`FlowLearner.minibatch_gradient` accumulates into ``.grad`` the gradient of the
loss of one optimizer minibatch (a :class:`~flowrl.flow.sampler.Rollout`, usually
``rollout.select(rows)``); the training loop owns everything around it, exactly as for
:class:`flowrl.text.learner.TextLearner`. For a stored transition ``x -> x'`` the velocity is
recomputed with grad and ``log p(x' | x) = sde_step(x, v, sigma, sigma_next, a, prev_sample=x').log_prob``
enters the clipped surrogate ``min(w A, clip(w, 1 - eps, 1 + eps) A)``, ``w = exp(log p - log p_old)``
(Flow-GRPO, arXiv 2505.05470), summed as ``L = sum_{i,t} m_it l_it / Z`` over the trained mask m,
one step's graph at a time (memory flat in the number of trained steps). The KL reference is the
same transformer with its LoRA adapter disabled (:mod:`flowrl.core.reference`), or a frozen copy
for full fine-tuning. Derivations (the per-row weight of GRPO's sequence mean, the two-pass
sequence-level ratio, the KL estimators, GRPO-Guard, exact on-policy batching):
``docs/methods.md`` (flowrl.flow.learner).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from flowrl.core.losses import LossConfig, StepTerms, mean_sq_diff, noise_aware_weights, policy_loss
from flowrl.core.reference import has_adapters, reference_policy, unwrap
from flowrl.core.stats import merge_stats
from flowrl.flow.policy import PromptEmbeds
from flowrl.flow.sampler import Rollout
from flowrl.flow.steps import sde_mean_std, sde_step

logger = logging.getLogger(__name__)

__all__ = [
    "STEP_WEIGHTINGS",
    "FlowLearner",
    "has_adapters",
    "kl_enabled",
    "reference_transformer",
    "scaled_noise_weights",
    "seq_mean_row_counts",
    "shared_state_runs",
    "velocity_takes_size",
]

#: Per-step weightings of the policy term understood by :class:`FlowLearner`.
STEP_WEIGHTINGS = ("none", "noise_aware")

# quantities of one step that depend on the parameters (pass 2 of the two-pass path)
_GRAD_KEYS = ("logps", "delta_sq", "ref_delta_sq", "v_ref_delta_sq")


# --------------------------------------------------------------------------------------------------
# reference model helpers
# --------------------------------------------------------------------------------------------------


def kl_enabled(loss: LossConfig, beta: Optional[float] = None) -> bool:
    """Whether the KL term can be non-zero: ``beta`` (or ``loss.beta``) > 0, or a non-constant schedule."""
    b = loss.beta if beta is None else float(beta)
    return b > 0 or loss.beta_schedule != "constant"


def reference_transformer(transformer: torch.nn.Module, loss: LossConfig,
                          needed: Optional[bool] = None) -> Optional[torch.nn.Module]:
    """The frozen KL reference to keep for a run, or None when none is needed.

    None when the KL is off (``beta == 0`` with a constant schedule; ``needed`` overrides that test,
    e.g. for a forward-process objective's reference) or when the transformer has a
    LoRA adapter (the reference is then the same weights with the adapter disabled). Otherwise (full
    fine-tuning with KL) a deep copy with ``requires_grad=False`` in eval mode: the only case that
    pays for a second copy of the weights.
    """
    if not (kl_enabled(loss) if needed is None else needed) or has_adapters(transformer):
        return None
    ref = copy.deepcopy(unwrap(transformer))
    ref.requires_grad_(False)
    ref.eval()
    return ref


# --------------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------------


def seq_mean_row_counts(trained: Tensor) -> Tensor:
    """``c_i = max(1, sum_t m_it)``: the per-row divisor of the ``seq-mean-token-mean`` aggregation.

    ``L = sum_i (1 / c_i) sum_t m_it l_it / Z`` (GRPO's sequence mean, DeepSeekMath arXiv 2402.03300,
    as :func:`flowrl.core.losses.aggregate`); one step's share of it is
    ``sum_i m_it l_it / (Z c_i)``, so a single-step loss call for rows with count c gets normaliser
    ``Z * c``. Returns int64 ``[N]``.
    """
    if trained.ndim != 2:
        raise ValueError(f"trained: must have shape [N, T], got {tuple(trained.shape)}")
    return trained.to(torch.bool).sum(-1).clamp(min=1).to(torch.int64)


def scaled_noise_weights(stds: Tensor, trained: Tensor, scale: float) -> Tensor:
    """Absolute noise-aware step weights ``w_nt = c · s_nt`` on trained transitions, 0 elsewhere.

    TempFlow-GRPO (arXiv 2508.04324; its training script, see ``docs/methods.md``) multiplies each
    trained transition's clipped surrogate by ``2.25 · s_j``, s_j the transition std (Flow-SDE:
    ``a sqrt(sigma / (1 - sigma)) sqrt(sigma - sigma_next)``) and 2.25 about ``1 / mean_j s_j`` over
    the 9 trainable steps of SD3's 10-step shift-3 schedule at a = 0.7 (2.2522). Unlike
    :func:`flowrl.core.losses.noise_aware_weights` nothing is normalised, so a minibatch's weights do
    not depend on what else it holds. Returns float32 ``[N, T]``.
    """
    if not math.isfinite(float(scale)) or float(scale) <= 0:
        raise ValueError(f"scale: must be a finite number > 0, got {scale!r}")
    s = torch.as_tensor(stds).to(torch.float32)
    m = torch.as_tensor(trained).to(torch.bool).to(s.device)
    if s.shape != m.shape:
        raise ValueError(f"stds: shape {tuple(s.shape)} differs from trained {tuple(m.shape)}")
    if bool((s[m] < 0).any()):
        raise ValueError("stds: must be >= 0")
    return torch.where(m, s * float(scale), torch.zeros_like(s))


def shared_state_runs(x: Tensor, *keys: Tensor) -> Tuple[Tensor, Tensor]:
    """Runs of consecutive rows with identical state: ``(keep, inverse)``.

    Row i is a repeat when ``x[i] == x[i-1]`` elementwise and every key agrees
    (``keys[k][i] == keys[k][i-1]``). ``keep`` marks the first row of each run and ``inverse`` maps
    every row to its run, so ``f(x[keep])[inverse] == f(x)`` for any row-wise ``f``. The sampler lays
    out a tree's siblings (and a ``same_noise`` group before its first SDE step) as such runs; computing
    their velocity once is G²RPO's shared-forward trick (arXiv 2510.01982).
    """
    n = x.shape[0]
    same = torch.zeros(n, dtype=torch.bool, device=x.device)
    if n > 1:
        flat = x.reshape(n, -1)
        rep = (flat[1:] == flat[:-1]).all(dim=1)
        for k in keys:
            k = k.to(x.device)
            rep &= (k[1:] == k[:-1]).reshape(n - 1, -1).all(dim=1)
        same[1:] = rep
    keep = ~same
    inverse = torch.cumsum(keep.to(torch.int64), 0) - 1
    return keep, inverse


def _rows_of(value: Tensor, rows: int) -> Tensor:
    """A transition std (``[B, 1, ..., 1]`` or 0-dim) as a ``[rows]`` tensor."""
    return value.reshape(-1).expand(rows) if value.numel() == 1 else value.reshape(rows)


def _pool_ratio_std(parts: List[Tuple[float, float, float]]) -> float:
    """Exact std of the union of groups given ``(count, mean, std)`` per group (population std):
    ``var = sum_k n_k (std_k^2 + (mean_k - M)^2) / sum_k n_k`` with ``M`` the pooled mean."""
    total = sum(n for n, _, _ in parts)
    if total <= 0:
        return 0.0
    mean = sum(n * m for n, m, _ in parts) / total
    var = sum(n * (s * s + (m - mean) ** 2) for n, m, s in parts) / total
    return math.sqrt(max(var, 0.0))


# --------------------------------------------------------------------------------------------------
# the learner
# --------------------------------------------------------------------------------------------------


class FlowLearner:
    """Minibatch gradients of the GRPO-family loss for a flow-matching policy.

    Args:
        policy: a :class:`flowrl.flow.policy.FlowPolicy` (or anything with its ``velocity`` and a
            ``transformer``); its trainable parameters receive the gradient.
        loss: the loss configuration (:class:`flowrl.core.losses.LossConfig`).
        guidance_scale: CFG scale of the training forward; None (default) = the rollout's own scale
            (the same CFG velocity as sampling, so the first pass is on-policy). Another value makes
            every ratio start away from 1 (Flow-GRPO's ``train.cfg=False`` variant).
        chunk_size: at most this many distinct states per velocity call, i.e. per forward/backward
            (None = all trained rows of a step at once). Chunks are cut between runs of shared
            states, so the sampler's ``chunk_size`` gives the sampler's batches.
        ref_transformer: a frozen reference for full fine-tuning with KL
            (:func:`reference_transformer`); leave None for LoRA (adapter disabled = reference).
        step_weighting: ``"none"`` or ``"noise_aware"`` (TempFlow-GRPO-style weights
            ``s_t / mean s`` on the policy term, :func:`flowrl.core.losses.noise_aware_weights`).
        step_weight_scale: with ``"noise_aware"``, use the absolute weights ``scale · s_t``
            (:func:`scaled_noise_weights`; TempFlow-GRPO's code: 2.25) instead of ``s_t / mean s``.
            None (default): the normalised weights.
        dedup: evaluate consecutive rows with the same state once (see :func:`shared_state_runs`).
    """

    def __init__(
        self,
        policy: Any,
        loss: LossConfig,
        *,
        guidance_scale: Optional[float] = None,
        chunk_size: Optional[int] = None,
        ref_transformer: Optional[torch.nn.Module] = None,
        step_weighting: str = "none",
        step_weight_scale: Optional[float] = None,
        dedup: bool = True,
    ) -> None:
        if not callable(getattr(policy, "velocity", None)):
            raise ValueError("policy: must have a velocity(x, sigma, embeds, guidance_scale) method")
        if not isinstance(loss, LossConfig):
            raise ValueError(f"loss: must be a LossConfig, got {type(loss).__name__}")
        if guidance_scale is not None and not math.isfinite(float(guidance_scale)):
            raise ValueError(f"guidance_scale: must be finite or None, got {guidance_scale!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size: must be an int >= 1 or None, got {chunk_size!r}")
        if step_weighting not in STEP_WEIGHTINGS:
            raise ValueError(f"step_weighting: must be one of {STEP_WEIGHTINGS}, got {step_weighting!r}")
        if step_weight_scale is not None:
            if step_weighting != "noise_aware":
                raise ValueError("step_weight_scale: only used with step_weighting='noise_aware'")
            if isinstance(step_weight_scale, bool) or not (math.isfinite(float(step_weight_scale))
                                                           and float(step_weight_scale) > 0):
                raise ValueError(f"step_weight_scale: must be a finite number > 0 or None, got {step_weight_scale!r}")
        self.policy = policy
        self.loss = loss.validate()
        self.guidance_scale = None if guidance_scale is None else float(guidance_scale)
        self.chunk_size = chunk_size
        self.step_weighting = step_weighting
        self.step_weight_scale = None if step_weight_scale is None else float(step_weight_scale)
        self.dedup = bool(dedup)
        self.ref_transformer = ref_transformer
        if ref_transformer is not None:
            ref_transformer.requires_grad_(False)
            ref_transformer.eval()
        transformer = getattr(policy, "transformer", None)
        lora = transformer is not None and has_adapters(transformer)
        if kl_enabled(self.loss) and ref_transformer is None and not lora:
            raise ValueError(
                "ref_transformer: the KL term (beta > 0 or a beta schedule) needs a reference: give the "
                "transformer a LoRA adapter (reference = adapter disabled) or pass "
                "ref_transformer=reference_transformer(policy.transformer, loss) for full fine-tuning"
            )
        self._takes_size = velocity_takes_size(policy)

    #: this learner trains denoising steps (log-probs of stored transitions; per-step tree advantages)
    trains_steps = True

    # ---- public helpers ------------------------------------------------------------------------

    @staticmethod
    def action_mask(rollout: Rollout, advantages: Tensor, keep: Tensor) -> Tensor:
        """``[N, T]``: the trained transitions of the valid rows ``keep``."""
        return rollout.trained.bool() & keep.to(torch.bool).to(rollout.trained.device).unsqueeze(1)

    @staticmethod
    def mask_actions(rollout: Rollout, mask: Tensor) -> None:
        rollout.trained = mask

    def needs_reference(self, beta: Optional[float] = None) -> bool:
        """Whether a minibatch with KL coefficient ``beta`` (None: ``loss.beta``) runs the reference forward."""
        b = self.loss.beta if beta is None else float(beta)
        return b > 0

    def noise_aware_step_weights(self, rollout: Rollout) -> Tensor:
        """``[N, T]`` weights ``s_nt / mean(s over trained entries)`` (0 where not trained), or
        ``step_weight_scale · s_nt`` when that is set (:func:`scaled_noise_weights`).

        TempFlow-GRPO (arXiv 2508.04324) weights steps by their "exploration potential"; we use the
        transition std s = sigma_t sqrt|dt| (:func:`flowrl.core.losses.noise_aware_weights`),
        normalised to mean 1 over the trained transitions of ``rollout``. Compute it once on the
        whole rollout and pass it to every minibatch (``step_weights=``) to make the weights
        independent of the minibatch split; by default each minibatch normalises over its own rows.
        The scaled weights need no normalisation and are the same whatever the split.
        """
        if self.step_weight_scale is not None:
            return scaled_noise_weights(rollout.stds, rollout.trained, self.step_weight_scale)
        m = rollout.trained.to(torch.bool)
        out = torch.zeros(m.shape, dtype=torch.float32, device=rollout.stds.device)
        if bool(m.any()):
            out[m] = noise_aware_weights(rollout.stds[m].to(torch.float32)).to(out.dtype)
        return out

    # ---- the gradient ----------------------------------------------------------------------------

    def minibatch_gradient(
        self,
        rollout: Rollout,
        advantages: Tensor,
        *,
        normalizer: Tensor | float,
        beta: Optional[float] = None,
        loss_scale: float = 1.0,
        backward: Optional[Callable[[Tensor], None]] = None,
        step_weights: Optional[Tensor] = None,
        on_policy: bool = False,
        epoch: int = 0,
    ) -> Dict[str, float]:
        """Accumulate the gradient of the loss of minibatch ``rollout`` into ``.grad``; return its stats.

        Args:
            rollout: the rows of one optimizer step on this process (e.g. ``rollout.select(rows)``).
            advantages: ``[N]`` (trajectory level, broadcast over steps) or ``[N, T]`` (per stored
                step: trees, granular methods), N = ``rollout.num_samples``, T = stored steps.
            normalizer: from :func:`flowrl.core.losses.loss_normalizers` on the trained mask of the
                whole optimizer batch (all processes), so that neither minibatches nor step-by-step
                accumulation nor chunking change the gradient.
            beta: the current KL coefficient (a schedule's value); None = ``loss.beta``. The
                reference forward runs only when it is > 0.
            loss_scale: multiplies every partial loss before ``backward``.
            backward: called on each partial loss (default ``loss.backward()``; pass
                ``accelerator.backward`` under accelerate, whose division by the accumulation steps
                the caller then compensates through ``loss_scale``). If it accepts a ``last``
                keyword it is called ``backward(loss, last=...)`` with ``last=True`` only on the
                minibatch's final backward (so DDP can skip the gradient all-reduce before it).
            step_weights: optional ``[N, T]`` weights on the policy term (overrides
                ``step_weighting``; see :meth:`noise_aware_step_weights`).
            epoch: the inner epoch (unused: this loss draws nothing at random).
            on_policy: the parameters are still those that sampled ``rollout`` (first inner epoch,
                before any optimizer step): the recomputed log-probs and means, detached, serve as
                the old ones, so every ratio is exactly 1 whatever the batching (the standard PPO
                shortcut). ``stored_ratio_dev_max`` then reports max |exp(log pi - stored old) - 1|,
                the float drift between the sampler's and the learner's forward.

        Returns:
            Statistics over the trained transitions of the minibatch (see
            :func:`flowrl.core.losses.policy_loss`): ``loss``, ``policy_loss`` and ``kl_loss`` are
            sums of the partial losses (their gradient is what was accumulated), ``ratio_*`` and
            ``clip_frac*`` are over all trained transitions (``ratio_std`` pooled exactly), plus
            ``num_actions`` (trained transitions), ``num_velocity_rows`` (rows sent through the
            transformer with grad) and ``num_backward`` (backward calls).
        """
        backward = _with_last(backward or (lambda loss: loss.backward()))
        n, t_steps = rollout.num_samples, rollout.num_stored_steps
        adv = self._check_advantages(advantages, n, t_steps)
        trained = rollout.trained.to(torch.bool).cpu()
        if trained.shape != (n, t_steps):
            raise ValueError(f"rollout: trained has shape {tuple(trained.shape)}, expected {(n, t_steps)}")
        if bool((trained & ~rollout.stochastic.to(torch.bool).cpu()).any()):
            raise ValueError("rollout: a trained transition is not stochastic (an ODE step has no log-prob)")
        cfg = self.loss
        if cfg.ratio_norm and rollout.means is None and not on_policy:
            raise ValueError("rollout: ratio_norm (GRPO-Guard) needs the old means; sample with store_means=True")
        if cfg.ratio_norm and bool((rollout.stds.cpu()[trained] <= 0).any()):
            raise ValueError("rollout: ratio_norm needs a positive std at every trained step")
        beta_now = cfg.beta if beta is None else float(beta)
        if not (math.isfinite(beta_now) and beta_now >= 0):
            raise ValueError(f"beta: must be a finite number >= 0, got {beta!r}")
        weights = self._step_weights(rollout, step_weights, trained)
        if not bool(trained.any()):
            logger.warning("minibatch_gradient: no trained transition in this minibatch; nothing to do")
            return {"loss": 0.0, "policy_loss": 0.0, "kl_loss": 0.0, "num_actions": 0.0,
                    "num_velocity_rows": 0.0, "num_backward": 0.0}
        ctx = _Context(self, rollout, beta_now, bool(on_policy))
        if cfg.ratio_level == "sequence":
            return self._two_pass(ctx, adv, trained, weights, normalizer, beta_now, loss_scale, backward)
        return self._one_pass(ctx, adv, trained, weights, normalizer, beta_now, loss_scale, backward)

    # ---- the two paths -----------------------------------------------------------------------------

    def _one_pass(self, ctx, adv, trained, weights, normalizer, beta_now, loss_scale, backward) -> Dict[str, float]:
        cfg = self.loss
        counts = seq_mean_row_counts(trained) if cfg.aggregation == "seq-mean-token-mean" else None
        raw_parts: List[Dict[str, Tensor]] = []  # stats stay tensors until the end: no device sync per step
        drifts: List[Tensor] = []
        n_back = 0
        chunks = list(self._chunks(trained, ctx.rollout))
        for i, (t, rows) in enumerate(chunks):
            q = ctx.step(rows, t, grad=True)
            logps = q["logps"]
            dev = logps.device
            old = ctx.rollout.log_probs[rows, t].to(dev, torch.float32)
            if ctx.on_policy:
                drifts.append((torch.exp(logps.detach() - old) - 1).abs().max())
                old = logps.detach()
            a = (adv[rows] if adv.ndim == 1 else adv[rows, t]).to(dev)
            w = None if weights is None else weights[rows, t].to(dev, torch.float32)
            groups = [(None, 1)] if counts is None else [
                (counts[rows] == c, int(c)) for c in torch.unique(counts[rows]).tolist()
            ]
            total = None
            for sel, c in groups:
                idx = None if sel is None else sel.nonzero().flatten().to(dev)
                k = logps.shape[0] if idx is None else idx.numel()
                loss, st = policy_loss(
                    _col(logps, idx), _col(old, idx), _take(a, idx), torch.ones(k, 1, dtype=torch.bool, device=dev),
                    cfg, normalizer=normalizer * c if c != 1 else normalizer,
                    ref_logps=None if q.get("ref_logps") is None else _col(q["ref_logps"], idx),
                    step_terms=_terms(q, idx, ctx.logp_scale), step_weights=None if w is None else _col(w, idx),
                    beta=beta_now,
                )
                total = loss if total is None else total + loss
                raw_parts.append(st)
            backward(total * loss_scale, i == len(chunks) - 1)
            n_back += 1
        parts = [({k: float(v) for k, v in st.items()}, float(st["num_actions"])) for st in raw_parts]
        out = merge_stats(parts)
        for k in ("loss", "policy_loss", "kl_loss"):  # partial losses add up to the minibatch loss
            out[k] = sum(p[k] for p, _ in parts)
        out["ratio_std"] = _pool_ratio_std([(p["num_actions"], p["ratio_mean"], p["ratio_std"]) for p, _ in parts])
        out["num_velocity_rows"] = float(ctx.velocity_rows)
        out["num_backward"] = float(n_back)
        if ctx.on_policy:
            out["stored_ratio_dev_max"] = float(torch.stack(drifts).max())
        return out

    def _two_pass(self, ctx, adv, trained, weights, normalizer, beta_now, loss_scale, backward) -> Dict[str, float]:
        """Sequence-level ratios: partial derivatives from a no-grad pass, then one graph per step."""
        cfg = self.loss
        n, t_steps = trained.shape
        chunks = list(self._chunks(trained, ctx.rollout))
        dev = ctx.device
        full = {k: torch.zeros(n, t_steps, dtype=torch.float32, device=dev)
                for k in (*_GRAD_KEYS, "std", "dt_abs", "ref_logps")}
        present: set[str] = set()
        for t, rows in chunks:  # pass 1: values only
            with torch.no_grad():
                q = ctx.step(rows, t, grad=False)
            ridx = rows.to(dev)
            for k, v in q.items():
                if v is not None and k in full:
                    full[k][ridx, t] = v.detach().to(torch.float32)
                    present.add(k)
        leaves = {k: full[k].clone().requires_grad_(k in _GRAD_KEYS) for k in present}
        mask = trained.to(dev)
        terms = StepTerms(
            std=leaves["std"], dt_abs=leaves["dt_abs"], delta_sq=leaves.get("delta_sq"),
            ref_delta_sq=leaves.get("ref_delta_sq"), v_ref_delta_sq=leaves.get("v_ref_delta_sq"),
            logp_scale=ctx.logp_scale,
        )
        old = ctx.rollout.log_probs.to(dev, torch.float32)
        drift = float((torch.exp(full["logps"] - old) - 1)[mask].abs().max())
        if ctx.on_policy:
            old = full["logps"].clone()  # pass 2 recomputes exactly these values
        loss, st = policy_loss(
            leaves["logps"], old, adv.to(dev), mask, cfg,
            normalizer=normalizer, ref_logps=leaves.get("ref_logps"), step_terms=terms,
            step_weights=None if weights is None else weights.to(dev, torch.float32), beta=beta_now,
        )
        keys = [k for k in _GRAD_KEYS if k in leaves]
        grads = dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)))
        n_back = 0
        ctx.velocity_rows = 0
        ref_in_pass2 = ctx.kl in ("latent", "velocity")  # k1/k2/k3: the reference log-prob is a constant
        for i, (t, rows) in enumerate(chunks):  # pass 2: one graph per step, chain rule through the partials
            q = ctx.step(rows, t, grad=True, ref=ref_in_pass2)
            ridx = rows.to(dev)
            sur = None
            for k in keys:
                g = grads.get(k)
                if g is None or q.get(k) is None:
                    continue
                term = (g[ridx, t].to(q[k].dtype) * q[k]).sum()
                sur = term if sur is None else sur + term
            if sur is None:  # no partial reached this step: a zero loss keeps DDP's last backward in place
                sur = q["logps"].sum() * 0.0
            backward(sur * loss_scale, i == len(chunks) - 1)
            n_back += 1
        out = {k: float(v) for k, v in st.items()}
        if ctx.on_policy:
            out["stored_ratio_dev_max"] = drift
        out["num_velocity_rows"] = float(ctx.velocity_rows)
        out["num_backward"] = float(n_back)
        return out

    # ---- internals ---------------------------------------------------------------------------------


    def _chunks(self, trained: Tensor, rollout: Rollout) -> Iterator[Tuple[int, Tensor]]:
        """``(t, rows)`` for every stored step with trained rows, split into chunks of at most
        ``chunk_size`` distinct states (runs of :func:`shared_state_runs` are never cut)."""
        for t in range(trained.shape[1]):
            rows = trained[:, t].nonzero().flatten()
            if rows.numel() == 0:
                continue
            if self.chunk_size is None or rows.numel() <= self.chunk_size:
                yield t, rows
                continue
            if self.dedup:
                ridx = rows.to(rollout.latents.device)
                keep, _ = shared_state_runs(rollout.latents[ridx, t],
                                            rollout.prompt_index[ridx.to(rollout.prompt_index.device)],
                                            rollout.sigmas[ridx.to(rollout.sigmas.device), t])
                state = torch.cumsum(keep.to(torch.int64), 0).cpu() - 1
            else:
                state = torch.arange(rows.numel())
            chunk = state // self.chunk_size
            for c in range(int(chunk[-1]) + 1):
                yield t, rows[chunk == c]

    def _step_weights(self, rollout: Rollout, step_weights: Optional[Tensor], trained: Tensor) -> Optional[Tensor]:
        if step_weights is not None:
            w = torch.as_tensor(step_weights, dtype=torch.float32)
            if w.shape != trained.shape:
                raise ValueError(f"step_weights: must have shape {tuple(trained.shape)}, got {tuple(w.shape)}")
            return w.cpu()
        if self.step_weighting == "noise_aware":
            return self.noise_aware_step_weights(rollout).cpu()
        return None

    @staticmethod
    def _check_advantages(advantages: Tensor, n: int, t_steps: int) -> Tensor:
        if not isinstance(advantages, Tensor):
            raise ValueError(f"advantages: must be a tensor of shape [N] or [N, T], got {type(advantages).__name__}")
        if advantages.shape not in ((n,), (n, t_steps)):
            raise ValueError(f"advantages: must have shape [{n}] or [{n}, {t_steps}] for this rollout, "
                             f"got {tuple(advantages.shape)}")
        if not bool(torch.isfinite(advantages).all()):
            raise ValueError("advantages: must be finite (NaN/inf found)")
        return advantages.detach().to(torch.float32).cpu()

    def _reference(self):
        """The policy as the KL reference (:func:`flowrl.core.reference.reference_policy`)."""
        return reference_policy(self.policy, self.ref_transformer)


class _Context:
    """Per-minibatch state: prompt embeddings, device, which reference terms are needed."""

    def __init__(self, learner: FlowLearner, rollout: Rollout, beta_now: float, on_policy: bool = False):
        self.learner = learner
        self.rollout = rollout
        self.on_policy = on_policy
        d = 1
        for size in rollout.latents.shape[2:]:
            d *= int(size)
        # GRPO-Guard's formula is for mean-reduced log-probs; a sum over D elements is D times that
        self.logp_scale = float(d) if rollout.reduction == "sum" else 1.0
        policy = learner.policy
        maker = getattr(policy, "embeds_from_tensors", None)
        if maker is not None:
            self.embeds = maker(rollout.embeds)
        else:
            self.embeds = PromptEmbeds.from_tensors(rollout.embeds)
        dev = getattr(policy, "device", None)
        self.device = torch.device(dev) if dev is not None else rollout.latents.device
        self.guidance = rollout.guidance_scale if learner.guidance_scale is None else learner.guidance_scale
        self.size_kwargs = {"height": rollout.height, "width": rollout.width} if (
            learner._takes_size and rollout.height > 0 and rollout.width > 0) else {}
        cfg = learner.loss
        self.need_ref = learner.needs_reference(beta_now)
        self.kl = cfg.kl_estimator if self.need_ref else None
        self.velocity_rows = 0

    def _velocity(self, x: Tensor, sigma: Tensor, prompts: Tensor, keep: Optional[Tensor], inverse: Optional[Tensor],
                  dedup: bool) -> Tensor:
        if dedup:
            xu, su, pu = x[keep], sigma[keep], prompts[keep]
        else:
            xu, su, pu = x, sigma, prompts
        v = self.learner.policy.velocity(xu, su, self.embeds.select(pu), self.guidance, **self.size_kwargs)
        if dedup:
            v = v.index_select(0, inverse)
        return v

    def step(self, rows: Tensor, t: int, *, grad: bool, ref: bool = True) -> Dict[str, Optional[Tensor]]:
        """Per-row quantities of stored transition ``t`` for ``rows`` (a CPU LongTensor): ``logps`` and
        the step terms, with grad when ``grad`` (and when grad mode is on). ``ref=False`` skips the
        reference forward (its terms are then None)."""
        r = self.rollout
        dev = self.device
        ridx = rows.to(r.latents.device)
        x = r.latents[ridx, t].to(dev).float()
        x_next = r.latents[ridx, t + 1].to(dev).float()
        sig = r.sigmas[ridx, t].to(dev, torch.float32)
        sig_n = r.sigma_next[ridx, t].to(dev, torch.float32)
        noise = r.noise_levels[ridx, t].to(dev, torch.float32)
        prompts = r.prompt_index[ridx.to(r.prompt_index.device)].to(dev)
        nrows = x.shape[0]
        if self.learner.dedup:
            keep, inverse = shared_state_runs(x, prompts, sig)
            dedup = not bool(keep.all())
        else:
            keep = inverse = None  # type: ignore[assignment]
            dedup = False
        self.velocity_rows += int(keep.sum()) if dedup else nrows
        v_ref = None
        # the reference forward goes first: its transient memory is freed before the step's graph exists
        if self.kl is not None and ref:
            with torch.no_grad(), self.learner._reference():
                v_ref = self._velocity(x, sig, prompts, keep, inverse, dedup).detach()
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            v = self._velocity(x, sig, prompts, keep, inverse, dedup)
            step = sde_step(x, v, sig, sig_n, noise, prev_sample=x_next, kind=r.sde_kind, reduction=r.reduction)
        std = _rows_of(step.std.detach(), nrows).to(torch.float32)
        out: Dict[str, Optional[Tensor]] = {
            "logps": step.log_prob,
            "std": std,
            "dt_abs": (sig - sig_n),
            "delta_sq": None,
            "ref_logps": None,
            "ref_delta_sq": None,
            "v_ref_delta_sq": None,
        }
        cfg = self.learner.loss
        if cfg.ratio_norm:
            if self.on_policy:
                mu_old = step.mean.detach()
            else:
                assert r.means is not None
                mu_old = r.means[ridx, t].to(dev).float()
            out["delta_sq"] = mean_sq_diff(step.mean, mu_old)
        if v_ref is not None:
            if self.kl in ("k1", "k2", "k3"):
                with torch.no_grad():
                    ref_step = sde_step(x, v_ref, sig, sig_n, noise, prev_sample=x_next, kind=r.sde_kind,
                                        reduction=r.reduction)
                out["ref_logps"] = ref_step.log_prob.detach()
            elif self.kl == "latent":
                with torch.no_grad():
                    mu_ref, _ = sde_mean_std(x, v_ref, sig, sig_n, noise, kind=r.sde_kind)
                out["ref_delta_sq"] = mean_sq_diff(step.mean, mu_ref)
            else:  # velocity
                out["v_ref_delta_sq"] = mean_sq_diff(v, v_ref)
        return out


def velocity_takes_size(policy: Any) -> bool:
    """Whether ``policy.velocity`` accepts ``height``/``width`` keywords (FLUX's packed latents need them)."""
    try:
        params = inspect.signature(policy.velocity).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    return "height" in params and "width" in params


def _with_last(backward: Callable[..., None]) -> Callable[[Tensor, bool], None]:
    """``backward`` as ``f(loss, last)``: passes ``last=`` only when ``backward`` takes that keyword."""
    try:
        params = inspect.signature(backward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    takes_last = "last" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if takes_last:
        return lambda loss, last: backward(loss, last=last)
    return lambda loss, last: backward(loss)


def _col(x: Tensor, idx: Optional[Tensor]) -> Tensor:
    """Rows ``idx`` (all if None) of a ``[rows]`` tensor as a ``[k, 1]`` column."""
    return (x if idx is None else x.index_select(0, idx)).reshape(-1, 1)


def _take(x: Tensor, idx: Optional[Tensor]) -> Tensor:
    return x if idx is None else x.index_select(0, idx)


def _terms(q: Dict[str, Optional[Tensor]], idx: Optional[Tensor], logp_scale: float = 1.0) -> StepTerms:
    """The :class:`StepTerms` of rows ``idx`` as ``[k, 1]`` columns."""

    def col(name: str) -> Optional[Tensor]:
        v = q.get(name)
        return None if v is None else _col(v, idx)

    return StepTerms(std=col("std"), dt_abs=col("dt_abs"), delta_sq=col("delta_sq"),
                     ref_delta_sq=col("ref_delta_sq"), v_ref_delta_sq=col("v_ref_delta_sq"), logp_scale=logp_scale)
