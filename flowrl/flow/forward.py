"""The forward-process learner: objectives on clean samples (DiffusionNFT, AWM, DGPO, Diffusion-DPO).

One call of :meth:`ForwardLearner.minibatch_gradient` accumulates the gradient of one optimizer
minibatch, like :class:`flowrl.flow.learner.FlowLearner`, from each row's clean latent ``x0``
(``rollout.final_latents``), its advantage and its prompt only. Per row it trains
``objective.num_timesteps`` noise levels ``sigma`` drawn from the rollout's own schedule
(:func:`timestep_indices`); at each one, with fresh noise ``eps``, ``x_t = (1 - sigma) x0 + sigma eps``,
the velocities ``v`` (with grad), ``v_old`` (the old policy swapped in, :class:`flowrl.core.shadow.DecayedCopy`)
and ``v_ref`` (the base model) enter the objective's pure loss (:mod:`flowrl.core.objectives`), one
backward per timestep and chunk. Every draw comes from ``flowrl.core.rng`` with keys (step, epoch,
sample/group), so neither the minibatch split nor the number of processes changes it.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from flowrl.core import rng
from flowrl.core.losses import mean_sq_diff
from flowrl.core.objectives import (
    ObjectiveConfig, awm_log_prob, best_worst_pairs, awm_loss, dgpo_loss, dpo_loss, dsm_clip_mask,
    nft_loss,
)
from flowrl.core.reference import reference_policy
from flowrl.core.shadow import DecayedCopy
from flowrl.core.stats import merge_stats
from flowrl.flow.learner import velocity_takes_size
from flowrl.flow.policy import PromptEmbeds
from flowrl.flow.sampler import Rollout

__all__ = ["ForwardLearner", "eligible_steps", "timestep_indices"]

#: the logit-normal draw indexes a schedule of this many steps (diffusers' num_train_timesteps)
LOGIT_NORMAL_STEPS = 1000


def eligible_steps(cfg: ObjectiveConfig, num_steps: int) -> Tuple[int, int]:
    """``[first, last)``: the rollout steps a timestep may be drawn from,
    ``last = int(num_steps * timestep_fraction)``."""
    first, last = cfg.timestep_first, int(num_steps * cfg.timestep_fraction)
    need = cfg.num_timesteps if cfg.timesteps == "permutation" else 1
    if cfg.timesteps != "logit_normal" and last - first < need:
        raise ValueError(f"num_timesteps: the rollout's steps [{first}, {last}) of {num_steps} hold fewer than the "
                         f"{need} timestep(s) to draw (see also timestep_first, timestep_fraction)")
    return first, last


def timestep_indices(cfg: ObjectiveConfig, num_steps: int, generator: torch.Generator) -> Tensor:
    """``[k]`` int64 indices of one draw unit's trained timesteps (k = ``num_timesteps``).

    permutation: k distinct eligible steps in random order (DiffusionNFT permutes the rollout's
    steps per sample and takes the first k; DGPO ``random.sample``); stratified: the eligible range
    cut at ``linspace(first, last, k + 1)`` and one step per stratum (AWM); logit_normal: indices
    ``floor(1000 sigmoid(z))``, ``z ~ N(0, 1)``, into the 1000-step schedule (flow_grpo's DPO)."""
    k = cfg.num_timesteps
    if cfg.timesteps == "logit_normal":
        u = torch.sigmoid(torch.randn(k, generator=generator, dtype=torch.float64))
        return (u * LOGIT_NORMAL_STEPS).floor().long().clamp(0, LOGIT_NORMAL_STEPS - 1)
    first, last = eligible_steps(cfg, num_steps)
    if cfg.timesteps == "permutation":
        return torch.randperm(last - first, generator=generator)[:k] + first
    bounds = torch.linspace(first, last, k + 1).long()
    u = torch.rand(k, generator=generator, dtype=torch.float64)
    return bounds[:-1] + (u * (bounds[1:] - bounds[:-1]).double()).floor().long()


class ForwardLearner:
    """Minibatch gradients of a forward-process objective for a flow policy.

    Args:
        policy: a :class:`flowrl.flow.policy.FlowPolicy` (``velocity``, ``sigmas``, ``transformer``).
        cfg: the :class:`flowrl.core.objectives.ObjectiveConfig` (not ``likelihood``).
        seed: the run's seed (the streams' root).
        group_size: the configured group size (DGPO's ``G``).
        chunk_size: at most this many rows per velocity call; DGPO and DPO keep a group whole.
        ref_transformer: a frozen reference for full fine-tuning (LoRA: adapters disabled).
        old: the old policy's weights (needed by nft, ``old_kl_beta`` and DGPO's clip).
    """

    def __init__(self, policy: Any, cfg: ObjectiveConfig, *, seed: int, group_size: int,
                 chunk_size: Optional[int] = None, ref_transformer: Optional[torch.nn.Module] = None,
                 old: Optional[DecayedCopy] = None) -> None:
        self.policy = policy
        self.cfg = cfg.validate()
        if not cfg.forward:
            raise ValueError("objective: the forward learner needs a forward-process objective, not 'likelihood'")
        self.seed = int(seed)
        self.group_size = int(group_size)
        self.chunk_size = chunk_size
        self.ref_transformer = ref_transformer
        self.old = old
        self._takes_size = velocity_takes_size(policy)

    #: this learner trains clean samples, not denoising steps (the rollout need not store a trajectory)
    trains_steps = False

    def set_old(self, old: Optional[DecayedCopy]) -> None:
        self.old = old

    def action_mask(self, ro: Rollout, advantages: Tensor, keep: Tensor) -> Tensor:
        """``[N, 1]``: one action per valid sample; for dpo one per pair, on its winner (each group's
        :func:`best_worst_pairs` among its valid rows; the roles kept in ``ro.pair_role``)."""
        keep = keep.to(torch.bool).cpu()
        if self.cfg.kind != "dpo":
            return keep.unsqueeze(1)
        adv = advantages.reshape(advantages.shape[0], -1)[:, 0].cpu()
        pairs = best_worst_pairs(adv, ro.group_id.cpu(), keep)
        role = torch.zeros(ro.num_samples, dtype=torch.long)
        role[pairs[:, 0]] = 1
        role[pairs[:, 1]] = -1
        ro.pair_role = role
        return (role == 1).unsqueeze(1)

    @staticmethod
    def mask_actions(ro: Rollout, mask: Tensor) -> None:
        ro.sample_mask = mask.reshape(mask.shape[0], -1).any(1)

    # ---- draws --------------------------------------------------------------------------------
    def _unit_key(self, key: Sequence[int], share: str) -> Tuple[int, ...]:
        """A row's draw unit: (step, record, position, member) for a sample, (step, record, position)
        for its group, (step,) for the batch."""
        return tuple(key[:{"sample": 4, "group": 3, "batch": 1}[share]])

    def _sigmas(self, ro: Rollout, epoch: int) -> Tensor:
        """``[N, k]`` float32 noise levels of the rows' trained timesteps."""
        cfg = self.cfg
        if cfg.timesteps == "logit_normal":
            sched = self.policy.sigmas(LOGIT_NORMAL_STEPS, ro.height, ro.width)
        else:
            sched = self.policy.sigmas(ro.num_steps, ro.height, ro.width)
        cache: Dict[Tuple[int, ...], Tensor] = {}
        out = []
        for key in ro.row_keys.tolist():
            u = self._unit_key(key, cfg.timestep_share)
            if u not in cache:
                cache[u] = timestep_indices(cfg, ro.num_steps, rng.generator(self.seed, "forward-t", epoch, *u))
            out.append(sched[cache[u]])
        return torch.stack(out).to(torch.float32)

    def _noise(self, ro: Rollout, rows: Tensor, epoch: int, j: int, shape: Tuple[int, ...]) -> Tensor:
        """``[len(rows), *shape]`` standard normal noise of timestep slot ``j``."""
        cache: Dict[Tuple[int, ...], Tensor] = {}
        out = []
        for key in ro.row_keys[rows].tolist():
            u = self._unit_key(key, self.cfg.noise_share)
            if u not in cache:
                cache[u] = torch.randn(shape, generator=rng.generator(self.seed, "forward-eps", epoch, j, *u))
            out.append(cache[u])
        return torch.stack(out)

    # ---- forwards -----------------------------------------------------------------------------
    def _velocity(self, x: Tensor, sigma: Tensor, embeds: PromptEmbeds, ro: Rollout) -> Tensor:
        kw = {"height": ro.height, "width": ro.width} if self._takes_size else {}
        return self.policy.velocity(x, sigma, embeds, self.cfg.guidance_scale, **kw)

    def _old_weights(self):
        """The old policy's weights swapped in (:meth:`flowrl.core.shadow.DecayedCopy.swapped`)."""
        if self.old is None:
            raise ValueError("objective: this objective needs the old policy (the trainer keeps one when objective.needs_old)")
        return self.old.swapped()

    # ---- the gradient -------------------------------------------------------------------------
    def minibatch_gradient(self, ro: Rollout, advantages: Tensor, *, normalizer: Tensor | float,
                           beta: Optional[float] = None, backward: Optional[Callable[..., None]] = None,
                           epoch: int = 0) -> Dict[str, float]:
        """Accumulate the gradient of ``sum_rows l / (Z k)`` into ``.grad`` (``Z = normalizer``, the
        valid samples of the optimizer batch over all processes, or its pairs for dpo; k timesteps per
        row); ``beta`` (the likelihood KL's coefficient) is unused. Returns the minibatch's statistics."""
        cfg = self.cfg
        backward = backward or (lambda loss, last=True: loss.backward())
        if ro.row_keys is None:
            raise ValueError("rollout: row_keys is needed by a forward-process objective (FlowTask.rollout sets it)")
        adv = advantages.detach().to(torch.float32).cpu().reshape(-1)
        mask = ro.sample_mask.to(torch.bool).cpu().reshape(-1)
        if adv.shape[0] != ro.num_samples or mask.shape[0] != ro.num_samples:
            raise ValueError(f"advantages: {adv.shape[0]} rows for a rollout of {ro.num_samples}")
        norm = float(normalizer)
        dev = torch.device(getattr(self.policy, "device", "cpu"))
        x0_all = ro.final_latents[:, 0]
        sig_all = self._sigmas(ro, epoch)
        maker = getattr(self.policy, "embeds_from_tensors", None)
        embeds = maker(ro.embeds) if maker is not None else PromptEmbeds.from_tensors(ro.embeds)
        k = cfg.num_timesteps
        units = self._units(ro, adv, mask)
        parts: List[Tuple[Dict[str, float], float]] = []
        chunks = self._chunks(units)
        for j in range(k):
            for c, chunk in enumerate(chunks):
                rows = torch.tensor([r for u in chunk for r in u], dtype=torch.long)
                x0 = x0_all[rows].to(dev).float()
                eps = self._noise(ro, rows, epoch, j, tuple(x0.shape[1:])).to(dev)
                sigma = sig_all[rows, j].to(dev)
                s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
                x_t = (1 - s) * x0 + s * eps
                emb = embeds.select(ro.prompt_index[rows])
                loss, st = self._chunk_loss(ro, rows, x0, eps, x_t, sigma, emb, adv[rows].to(dev))
                part = loss / (norm * k)
                backward(part, last=j == k - 1 and c == len(chunks) - 1)
                st["loss"] = float(part.detach())
                st["num_backward"] = 1.0
                parts.append((st, float(len(chunk))))
        if not parts:  # no valid sample on this process: a zero gradient, so that every process steps alike
            params = [p for p in self.policy.transformer.parameters() if p.requires_grad]
            backward(sum(p.sum() for p in params) * 0.0, last=True)
        out = merge_stats(parts)
        out["num_actions"] = float(len(units) if cfg.kind == "dpo" else sum(len(u) for u in units))
        return out

    def _units(self, ro: Rollout, adv: Tensor, mask: Tensor) -> List[List[int]]:
        """Rows grouped as the objective needs them together: single valid rows (nft, awm), each
        group's valid rows (dgpo), each group's (winner, loser) pair (dpo, from its sample mask)."""
        kind = self.cfg.kind
        if kind == "dpo":
            if ro.pair_role is None:
                raise ValueError("rollout: dpo needs pair_role (set with the sample mask, see FlowTask.action_mask)")
            role, group = ro.pair_role.cpu(), ro.group_id.cpu()
            pairs = []
            for w in (mask & (role == 1)).nonzero().flatten().tolist():
                losers = ((group == group[w]) & (role == -1)).nonzero().flatten().tolist()
                if len(losers) != 1:
                    raise ValueError(f"rollout: the pair of row {w} has {len(losers)} losers")
                pairs.append([w, losers[0]])
            return pairs
        if kind == "dgpo":
            groups: Dict[int, List[int]] = {}
            for i, g in enumerate(ro.group_id.cpu().tolist()):
                if bool(mask[i]):
                    groups.setdefault(g, []).append(i)
            return list(groups.values())
        return [[i] for i in range(ro.num_samples) if bool(mask[i])]

    def _chunks(self, units: List[List[int]]) -> List[List[List[int]]]:
        """Units packed into chunks of at most ``chunk_size`` rows (a unit is never split)."""
        if self.chunk_size is None:
            return [units] if units else []
        out: List[List[List[int]]] = []
        cur: List[List[int]] = []
        size = 0
        for u in units:
            if cur and size + len(u) > self.chunk_size:
                out.append(cur)
                cur, size = [], 0
            cur.append(u)
            size += len(u)
        if cur:
            out.append(cur)
        return out

    def _chunk_loss(self, ro: Rollout, rows: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, sigma: Tensor,
                    emb: PromptEmbeds, adv: Tensor) -> Tuple[Tensor, Dict[str, float]]:
        """The sum over the chunk's units (``rows``; dpo: winner, loser, winner, ...) of the objective's
        loss at one timestep, and its statistics."""
        cfg = self.cfg
        target = eps - x0
        with torch.no_grad():
            v_old = None
            if cfg.old_velocity:
                with self._old_weights():
                    v_old = self._velocity(x_t, sigma, emb, ro)
            v_ref = None
            if cfg.needs_reference:
                with reference_policy(self.policy, self.ref_transformer):
                    v_ref = self._velocity(x_t, sigma, emb, ro)
        v = self._velocity(x_t, sigma, emb, ro)
        st: Dict[str, float] = {}
        if cfg.kind == "nft":
            per = nft_loss(v, v_old, x_t, x0, sigma, adv, cfg.beta, cfg.adv_clip)
        elif cfg.kind == "awm":
            lp = awm_log_prob(v, target, sigma, cfg.weighting, cfg.ghuber_power)
            per = awm_loss(lp, lp.detach(), adv, cfg.adv_clip, cfg.clip_range)
        elif cfg.kind == "dgpo":
            e = mean_sq_diff(v, target)
            e_ref = mean_sq_diff(v_ref, target)
            a = adv.clamp(-cfg.adv_clip, cfg.adv_clip)
            clipped = None
            if cfg.clip_range is not None:
                clipped = dsm_clip_mask(e, mean_sq_diff(v_old, target), a, cfg.clip_range)
                st["clip_frac"] = float(clipped.float().mean())
            group = ro.group_id[rows].to(e.device)
            per = dgpo_loss(e, e_ref, a, group, cfg.beta, self.group_size, clipped)
        else:  # dpo: rows are (winner, loser) pairs
            e = mean_sq_diff(v, target)
            e_ref = mean_sq_diff(v_ref, target)
            per = dpo_loss(e[0::2], e[1::2], e_ref[0::2], e_ref[1::2], cfg.beta)
            st["dpo_accuracy"] = float(((e[0::2] - e_ref[0::2]) < (e[1::2] - e_ref[1::2])).float().mean())
        loss = per.sum()
        kl_w = 0.5 if cfg.kind == "dpo" else 1.0  # a dpo pair's two rows carry one unit of the normaliser
        if cfg.kl_beta > 0:
            kl = mean_sq_diff(v, v_ref)
            loss = loss + cfg.kl_beta * kl_w * kl.sum()
            st["kl"] = float(kl.detach().mean())
        if cfg.old_kl_beta > 0:
            okl = mean_sq_diff(v, v_old)
            loss = loss + cfg.old_kl_beta * kl_w * okl.sum()
            st["old_kl"] = float(okl.detach().mean())
        st["policy_loss"] = float(per.detach().mean())
        return loss, st

