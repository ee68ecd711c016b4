"""GRPO for transformers causal LMs through the shared loss core (:mod:`flowrl.core.losses`).

The learner does two things the training loop composes: a rollout (G completions per prompt,
old and reference token log-probs stored) and the gradient of one optimizer minibatch (token
log-probs recomputed with grad in chunks, :func:`flowrl.core.losses.policy_loss`, backward).
The loop owns the optimizer step, the epochs over a rollout and the processes. Per token the loss is
GRPO's (DeepSeekMath, arXiv 2402.03300) ``-min(w A, clip(w, 1 - eps, 1 + eps) A) + beta KL`` with
``w = exp(log pi(o_t) - log pi_old(o_t))`` and the reference the model with its LoRA adapter
disabled (:mod:`flowrl.core.reference`) or a given ``ref_model``.

Loss variants are the names TRL users know (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``gspo``,
...): :func:`flowrl.core.losses.loss_preset` documents where they match TRL 1.16 and where not.
Two text-only variants live here too: a ``teacher_model`` whose token log-probs are stored at the
rollout for KDRL's teacher KL, and DisCO (``loss.surrogate: disco``), whose group loss is not a sum
over tokens and is therefore computed in two passes (:meth:`TextLearner._disco_gradient`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from flowrl.core.losses import (
    LossConfig, disco_loss, gtpo_conflict_weights, gtpo_entropy_advantages, kl_penalty, linear_ramp,
    mean_token_entropy, policy_loss, sequence_scores, top_fraction_mask,
)
from flowrl.core.reference import adapters_disabled, has_adapters
from flowrl.core.stats import merge_stats
from flowrl.text.rollout import TextRollout, embedding_grad_norms, generate, token_logps


def _ref_context(model, ref_model):
    """Context in which ``model`` computes reference log-probs: the same model with its LoRA
    adapter disabled (no second copy of the weights), or ``ref_model`` when given."""
    if ref_model is not None:
        return contextlib.nullcontext()
    if has_adapters(model):
        return adapters_disabled(model)
    raise ValueError("a KL term (beta > 0) needs a LoRA model (reference = adapter disabled) or a ref_model")


@contextlib.contextmanager
def _eval_mode(model):
    """No dropout while log-probs are computed outside the update (which runs in eval mode too)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class TextLearner:
    """Rollouts and minibatch gradients for a causal LM policy.

    Args:
        model: a transformers causal LM (optionally a peft ``PeftModel``).
        tokenizer: its tokenizer (left padding is set).
        loss: the loss configuration (e.g. ``loss_preset("grpo", beta=0.04)``).
        max_new_tokens, temperature, top_k, top_p: sampling settings; log-probs use
            ``logits / temperature`` as TRL does.
        chunk_size: rows per forward pass when computing log-probs (memory bound).
        ref_model: a frozen reference for full fine-tuning with KL; LoRA runs leave it None.
        teacher_model: a frozen teacher sharing the tokenizer (KDRL, ``loss.teacher_beta``): its
            token log-probs of each rollout are stored in ``TextRollout.teacher_logps``.
    """

    def __init__(self, model, tokenizer, loss: LossConfig, *, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, chunk_size: int = 16, ref_model=None,
                 teacher_model=None):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.loss = loss.validate()
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_k, self.top_p = top_k, top_p
        self.chunk_size = int(chunk_size)
        self.ref_model = ref_model
        self.forward_model = None  # accelerate's wrapper of ``model`` (DDP/FSDP) for the update's forward passes
        if ref_model is not None:
            ref_model.requires_grad_(False).eval()
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False).eval()
        self.reduce_fn: Optional[Callable[[Tensor], Tensor]] = None  # sums over processes (DisCO's global counts)
        self.world = 1  # processes whose gradients the loop averages

    @property
    def needs_ref(self) -> bool:
        return self.loss.beta > 0 or self.loss.beta_schedule != "constant"

    def _logps(self, model, ro: TextRollout) -> Tensor:
        return token_logps(model, ro.input_ids(), ro.attention_mask(), ro.completion_ids.shape[1],
                           temperature=self.temperature, chunk_size=self.chunk_size)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str], *, group_size, seed: int, prompt_keys=None,
                old_logps: bool = True) -> TextRollout:
        """Sample (:meth:`generate`; ``group_size``: an int, or one per prompt), then :meth:`complete`: the
        reference's log-probs when KL is on and, unless ``old_logps`` is False, the sampling policy's."""
        return self.complete(self.generate(prompts, group_size=group_size, seed=seed, prompt_keys=prompt_keys),
                             old_logps=old_logps)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, group_size, seed: int, prompt_keys=None) -> TextRollout:
        """The completions alone (no log-probs): what rewards need. :meth:`complete` adds the log-probs,
        after the sub-batches of a step are joined (:func:`flowrl.text.rollout.concat_text_rollouts`)."""
        return generate(self.model, self.tokenizer, prompts, group_size=group_size, max_new_tokens=self.max_new_tokens,
                        seed=seed, prompt_keys=prompt_keys, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @torch.no_grad()
    def complete(self, ro: TextRollout, *, old_logps: bool = True) -> TextRollout:
        """Store the reference's log-probs when KL is on and, unless ``old_logps`` is False, the sampling
        policy's (:meth:`fill_old_logps` on every row); returns ``ro``. Without them the caller fills the
        rows it needs before its first optimizer step and marks that step ``on_policy``."""
        if old_logps:
            self.fill_old_logps(ro, torch.arange(ro.num_samples))
        if self.needs_ref:
            with _eval_mode(self.model), _ref_context(self.model, self.ref_model):
                ro.ref_logps = self._logps(self.ref_model or self.model, ro).cpu()
        if self.teacher_model is not None:
            ro.teacher_logps = self._logps(self.teacher_model, ro).cpu()
        return ro

    @torch.no_grad()
    def fill_old_logps(self, ro: TextRollout, rows: Tensor) -> None:
        """Store the current (sampling) policy's token log-probs of ``rows`` in ``ro.old_logps``;
        other rows stay NaN. Computed in eval mode (as the update) with the update's chunking, so on
        a minibatch of the same rows the first inner step is exactly on-policy."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if ro.old_logps is None:
            ro.old_logps = torch.full(ro.completion_ids.shape, float("nan"))
        if rows.numel() == 0:
            return
        ro.old_logps[rows] = self._policy_logps(ro.select(rows))

    @torch.no_grad()
    def sequence_logps(self, ro: TextRollout) -> Tensor:
        """``[N]`` each completion's mean token log-prob under the sampling policy (``ro.old_logps``;
        the rows the rollout skipped are filled first, :meth:`fill_old_logps`). Call before any
        update of the rollout. Rewarding the unlikely ranks a group's members by it."""
        m = ro.completion_mask.bool()
        missing = torch.ones(ro.num_samples, dtype=torch.bool) if ro.old_logps is None else \
            torch.isnan(torch.where(m, ro.old_logps, torch.zeros(()))).any(1)
        self.fill_old_logps(ro, missing.nonzero().flatten())
        lp = torch.where(m, ro.old_logps.to(torch.float64), torch.zeros((), dtype=torch.float64))
        return lp.sum(1) / m.sum(1).clamp(min=1).to(torch.float64)

    def _policy_logps(self, ro: TextRollout) -> Tensor:
        """``[N, Lc]`` token log-probs of ``ro`` under the current policy, on the CPU: in eval mode (as the
        update) with the update's chunking."""
        with _eval_mode(self.model):
            return self._logps(self.model, ro).cpu()

    @torch.no_grad()
    def policy_logps(self, ro: TextRollout) -> Tensor:
        """:meth:`_policy_logps` with 0 on masked positions (what SPO's drift compares)."""
        lp = self._policy_logps(ro)
        return torch.where(ro.completion_mask.bool(), lp, torch.zeros((), dtype=lp.dtype))

    def embedding_grad_norms(self, ro: TextRollout, rows: Tensor) -> Tensor:
        """``[len(rows)]`` float64: GVM-RAFT's ``G`` of each of those completions under the current policy
        (:func:`flowrl.text.rollout.embedding_grad_norms`, in eval mode with the update's chunking)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() == 0:
            return torch.zeros(0, dtype=torch.float64)
        sub = ro.select(rows)
        with _eval_mode(self.model):
            return embedding_grad_norms(self.model, sub.input_ids(), sub.attention_mask(), sub.completion_mask,
                                        temperature=self.temperature, chunk_size=self.chunk_size)

    def minibatch_gradient(self, ro: TextRollout, advantages: Tensor, *, normalizer, beta: Optional[float] = None,
                           loss_scale: float = 1.0, backward: Optional[Callable[[Tensor, bool], None]] = None,
                           on_policy: bool = False, teacher_beta: Optional[float] = None) -> Dict[str, float]:
        """Accumulate the gradient of the loss of minibatch ``ro`` (already the rows of one
        optimizer step on this process) into ``.grad``; returns summed statistics.

        ``normalizer`` comes from :func:`flowrl.core.losses.loss_normalizers` on the whole
        optimizer batch (all processes), so chunking does not change the gradient. ``loss_scale``
        multiplies each chunk's loss (e.g. the process count under DDP averaging is already in
        the normaliser; leave 1). ``backward(loss, last)`` defaults to ``loss.backward()``;
        ``last`` is True for the minibatch's final backward pass (where a data-parallel wrapper
        should synchronise gradients; the others can run under ``no_sync``).

        ``on_policy``: the parameters are still those that sampled ``ro`` (the first optimizer step
        of the first epoch): the recomputed log-probs, detached, are the old ones (ratio exactly 1,
        as TRL does with one update per generation batch), so ``ro.old_logps`` is not needed.
        ``teacher_beta`` is KDRL's current teacher coefficient (None: ``loss.teacher_beta``). DisCO
        ignores ``normalizer`` (:meth:`_disco_gradient`)."""
        if not on_policy and (ro.old_logps is None or bool(torch.isnan(ro.old_logps[ro.completion_mask.bool()]).any())):
            raise ValueError("rollout: old log-probs missing for an off-policy minibatch (fill_old_logps before the first update)")
        backward = backward or (lambda loss, last: loss.backward())
        model = self.forward_model or self.model
        n = ro.num_samples
        parts = []
        device = next(self.model.parameters()).device
        if self.loss.surrogate == "disco":
            return self._disco_gradient(ro, advantages, model, device, loss_scale, backward, on_policy)
        weights = self.token_weights(ro, advantages, model)
        chunk_entropy = self.loss.entropy_max is not None or self.loss.entropy_scale != 0
        for s in range(0, n, self.chunk_size):
            rows = torch.arange(s, min(n, s + self.chunk_size))
            part = ro.select(rows)
            out = token_logps(model, part.input_ids(), part.attention_mask(), part.completion_ids.shape[1],
                              temperature=self.temperature, chunk_size=None, with_entropy=chunk_entropy)
            logps, entropy = out if chunk_entropy else (out, None)
            mask = part.completion_mask.to(device)
            adv = advantages[rows].to(device)
            if entropy is not None:  # GTPO: filter / penalise each completion by its mean token entropy
                adv = gtpo_entropy_advantages(adv, mean_token_entropy(entropy, mask), self.loss.entropy_max,
                                              self.loss.entropy_scale)
            old = logps.detach() if on_policy else part.old_logps.to(device)
            loss, st = policy_loss(
                logps, old, adv, mask, self.loss,
                normalizer=normalizer, ref_logps=None if part.ref_logps is None else part.ref_logps.to(device), beta=beta,
                step_weights=None if weights is None else weights[rows].to(device, logps.dtype),
                teacher_logps=None if part.teacher_logps is None else part.teacher_logps.to(device), teacher_beta=teacher_beta,
            )
            backward(loss * loss_scale, s + self.chunk_size >= n)
            parts.append(({**{k: float(v) for k, v in st.items()}, "loss": float(loss.detach())}, float(mask.sum())))
        return merge_stats(parts)

    def token_weights(self, ro: TextRollout, advantages: Tensor, model=None) -> Optional[Tensor]:
        """``[N, T]`` weights on the policy term of minibatch ``ro`` (None: all 1), from its whole groups:
        GTPO's conflict weights divided by each completion's conflict count
        (:func:`flowrl.core.losses.gtpo_conflict_weights`) and D3S's token selection, the fraction
        ``linear_ramp(ro.step, token_keep, token_keep_end, token_keep_steps)`` of the tokens with the
        highest |A| x entropy (:func:`flowrl.core.losses.top_fraction_mask`; dropped tokens weigh 0 and
        stay in the normaliser). The entropies come from one extra forward pass without grad over the
        minibatch (the ranking needs all of them before the first chunk's backward)."""
        cfg, w = self.loss, None
        mask = ro.completion_mask.bool()
        adv = advantages.detach().cpu()
        if cfg.conflict_weight is not None:
            if adv.ndim != 1:
                raise ValueError("advantages: GTPO's conflict weights need one advantage per completion ([N])")
            delta, n_conf = gtpo_conflict_weights(ro.completion_ids, mask, adv, ro.prompt_index, cfg.conflict_weight)
            w = delta / n_conf.clamp(min=1).unsqueeze(1).to(delta.dtype)
        frac = None if cfg.token_keep is None else linear_ramp(ro.step, cfg.token_keep, cfg.token_keep_end,
                                                               cfg.token_keep_steps)
        if frac is not None and frac < 1.0:
            with torch.no_grad():
                _, entropy = token_logps(model or self.model, ro.input_ids(), ro.attention_mask(),
                                         ro.completion_ids.shape[1], temperature=self.temperature,
                                         chunk_size=self.chunk_size, with_entropy=True)
            score = adv.to(torch.float64).reshape(adv.shape[0], -1).abs() * entropy.cpu().to(torch.float64)
            groups = ro.prompt_index if cfg.token_keep_scope == "group" else None
            keep = top_fraction_mask(score, mask, frac, groups).to(torch.float64)
            w = keep if w is None else w * keep
        return w

    # -- DisCO ---------------------------------------------------------------------------------------
    def _disco_gradient(self, ro: TextRollout, advantages: Tensor, model, device, loss_scale: float,
                        backward: Callable[[Tensor, bool], None], on_policy: bool) -> Dict[str, float]:
        """The gradient of DisCO's loss (:func:`flowrl.core.losses.disco_loss`) over this optimizer
        minibatch, in two passes so that chunking and processes do not change it.

        The loss couples rows: the log-sum-exp runs over a group's negatives and the squared hinge
        takes the KL of the whole optimizer batch (all processes). Pass 1 (no grad) computes every
        row's score s_i and the batch KL k at the current weights; the loss's partial derivatives
        c_i = dL/ds_i and c_k = dL/dk follow there (autograd on ``disco_loss``, float64). Pass 2
        backpropagates, chunk by chunk, sum_i c_i s_i(theta) + c_k k_local(theta): the same
        gradient as the loss itself (the chain rule), times the process count (the loop averages
        gradients over processes). Groups are this minibatch's prompts (they never span processes).
        """
        cfg = self.loss
        n, lc = ro.num_samples, ro.completion_ids.shape[1]
        reduce = self.reduce_fn or (lambda t: t)
        mask = ro.completion_mask.bool().to(device)
        group = torch.unique(ro.prompt_index, return_inverse=True)[1].to(device)
        adv = advantages.detach().to(device)
        with torch.no_grad():
            lp = token_logps(model, ro.input_ids(), ro.attention_mask(), lc, temperature=self.temperature,
                             chunk_size=self.chunk_size)
            old = lp if on_policy else ro.old_logps.to(device)  # on-policy: the sampling policy is the current one
            scores = sequence_scores(lp, old, mask, cfg.disco_score)
            tok_kl = self._disco_token_kl(lp, old, mask)
            counts = reduce(torch.stack([tok_kl.double().sum(), mask.sum().double(),
                                         torch.tensor(float(int(group.max()) + 1 if n else 0), dtype=torch.float64,
                                                      device=device)]).cpu())
        tokens, num_groups = float(counts[1].clamp(min=1.0)), int(counts[2])
        s_req = scores.detach().double().requires_grad_(True)
        k_req = (counts[0] / tokens).to(device).requires_grad_(True)
        loss, st = disco_loss(s_req, k_req, adv, group, cfg, num_groups=max(num_groups, 1))
        c_s, c_k = torch.autograd.grad(loss, (s_req, k_req))
        scale = float(self.world) * loss_scale
        for s in range(0, n, self.chunk_size):
            rows = torch.arange(s, min(n, s + self.chunk_size))
            part = ro.select(rows)
            logps = token_logps(model, part.input_ids(), part.attention_mask(), lc, temperature=self.temperature,
                                chunk_size=None)
            m = part.completion_mask.bool().to(device)
            o = old[rows.to(device)]
            sc = sequence_scores(logps, o, m, cfg.disco_score)
            kl_sum = self._disco_token_kl(logps, o, m).sum()
            surrogate = (c_s[rows.to(device)].to(logps.dtype) * sc).sum() + c_k.to(logps.dtype) * kl_sum / tokens
            backward(surrogate * scale, s + self.chunk_size >= n)
        lr = torch.where(mask, lp - old, torch.zeros_like(lp))
        w = torch.exp(lr)[mask]
        out = {k: float(v) for k, v in st.items()}
        out.update({
            "loss": float(loss.detach()), "num_actions": float(mask.sum()),
            "approx_kl": float((0.5 * lr[mask].double() ** 2).mean()) if w.numel() else 0.0,
            "ratio_mean": float(w.double().mean()) if w.numel() else 1.0,
            "ratio_min": float(w.min()) if w.numel() else 1.0, "ratio_max": float(w.max()) if w.numel() else 1.0,
        })
        return out

    def _disco_token_kl(self, logps: Tensor, old: Tensor, mask: Tensor) -> Tensor:
        """Per-token estimate of KL(pi_old || pi_theta) (``loss.disco_kl``: k1 = log pi_old - log pi,
        k3 = w - 1 - log w), 0 where masked."""
        safe_old = torch.where(mask, old.to(logps.dtype), torch.zeros_like(logps))
        safe_new = torch.where(mask, logps, torch.zeros_like(logps))
        kl = kl_penalty(safe_old, safe_new, self.loss.disco_kl)
        return torch.where(mask, kl, torch.zeros_like(kl))
