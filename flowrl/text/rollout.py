"""Text rollouts: G completions per prompt with ``generate``, and token log-probs in chunks.

Sampling draws each row's randomness from its own generator,
``flowrl.core.rng.generator(seed, "sample", *prompt key, member)``: a completion does not depend on
which other prompts share the batch or on how many processes split the batch. It uses the
Gumbel-max identity (argmax(logits/T + Gumbel) is a sample of softmax(logits/T)) inside
``generate``'s greedy search, so the batched, KV-cached generation loop of transformers does the work.

Log-probs follow TRL's convention: ``log_softmax(logits / temperature)`` of the taken token, with
no top-k/top-p renormalisation (TRL ``GRPOTrainer._get_per_token_logps_and_entropies``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from flowrl.core import rng


class GumbelSampler:
    """A ``LogitsProcessor`` that turns greedy search into sampling with per-row generators.

    scores -> scores / T, keep the top-k and the top-p nucleus (others -inf), then add
    Gumbel(0, 1) noise drawn from row i's generator; the greedy argmax is then an exact sample of
    the temperature/top-k/top-p distribution (Gumbel-max trick)."""

    def __init__(self, generators: Sequence[torch.Generator], temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None):
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        self.generators = list(generators)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        s = scores.float() / self.temperature
        if self.top_k is not None and 0 < self.top_k < s.shape[-1]:
            kth = torch.topk(s, self.top_k, dim=-1).values[..., -1:]
            s = s.masked_fill(s < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_s, idx = torch.sort(s, descending=True, dim=-1)
            probs = torch.softmax(sorted_s, dim=-1)
            cum = probs.cumsum(-1)
            drop_sorted = (cum - probs) >= self.top_p  # keep the smallest prefix reaching top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
            s = s.masked_fill(drop, float("-inf"))
        u = torch.stack([torch.rand(s.shape[-1], generator=g) for g in self.generators]).to(s.device)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
        return s + gumbel


@dataclass
class TextRollout:
    """A batch of N = prompts x G completions, as plain tensors (completions' text kept beside)."""

    prompt_ids: Tensor  # [N, Lp] left-padded prompt tokens
    prompt_mask: Tensor  # [N, Lp] 1 on real prompt tokens
    completion_ids: Tensor  # [N, Lc] right-padded completion tokens
    completion_mask: Tensor  # [N, Lc] 1 on completion tokens up to and including the first EOS
    prompt_index: Tensor  # [N] index of the prompt in the batch's prompt list
    truncated: Tensor  # [N] bool: no EOS within max_new_tokens
    old_logps: Optional[Tensor] = None  # [N, Lc] log-probs under the sampling policy
    ref_logps: Optional[Tensor] = None  # [N, Lc] log-probs under the reference policy (KL)
    completions: List[str] = field(default_factory=list)  # decoded text (for reward functions)
    groups_per_prompt: int = 1  # advantage groups per prompt (one: a prompt's G completions)
    step: int = 0  # the training step that sampled it (for schedules over steps, e.g. D3S's token fraction)
    teacher_logps: Optional[Tensor] = None  # [N, Lc] log-probs under a teacher model (KDRL)

    @property
    def num_samples(self) -> int:
        return int(self.completion_ids.shape[0])

    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def select(self, rows) -> "TextRollout":
        rows = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return TextRollout(
            prompt_ids=self.prompt_ids[rows], prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows], completion_mask=self.completion_mask[rows],
            prompt_index=self.prompt_index[rows], truncated=self.truncated[rows],
            old_logps=pick(self.old_logps), ref_logps=pick(self.ref_logps),
            completions=[self.completions[i] for i in rows.tolist()] if self.completions else [],
            step=self.step,
            teacher_logps=pick(self.teacher_logps),
        )


def concat_text_rollouts(parts: Sequence[TextRollout], pad_token_id: int) -> TextRollout:
    """The rollouts of consecutive prompt sub-batches as one, rows in order: prompts left-padded and
    completions right-padded with ``pad_token_id`` to the longest (masks 0 there, stored log-probs 0,
    as :func:`generate` pads one batch); ``prompt_index`` shifted by the prompts of earlier parts.
    Position ids follow the attention mask (:func:`token_logps`), so the padding moves no token."""
    parts = list(parts)
    if not parts:
        raise ValueError("parts: no rollout to concatenate")
    if len(parts) == 1:
        return parts[0]
    for name in ("old_logps", "ref_logps"):
        if len({getattr(r, name) is None for r in parts}) > 1:
            raise ValueError(f"parts: {name} is set in some parts and None in others")
    if len({bool(r.completions) for r in parts}) > 1:
        raise ValueError("parts: completions' text is kept in some parts and not in others")
    lp = max(r.prompt_ids.shape[1] for r in parts)
    lc = max(r.completion_ids.shape[1] for r in parts)

    def pad(t, width, value, left=False):
        n = width - t.shape[1]
        if n == 0:
            return t
        fill = torch.full((t.shape[0], n), value, dtype=t.dtype, device=t.device)
        return torch.cat([fill, t] if left else [t, fill], dim=1)

    offsets, n = [], 0
    for r in parts:
        offsets.append(n)
        n += int(r.prompt_index.max()) + 1 if r.num_samples else 0
    logps = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                          else torch.cat([pad(getattr(r, name), lc, 0.0) for r in parts]))
    return TextRollout(
        prompt_ids=torch.cat([pad(r.prompt_ids, lp, pad_token_id, left=True) for r in parts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, lp, 0, left=True) for r in parts]),
        completion_ids=torch.cat([pad(r.completion_ids, lc, pad_token_id) for r in parts]),
        completion_mask=torch.cat([pad(r.completion_mask, lc, 0) for r in parts]),
        prompt_index=torch.cat([r.prompt_index + o for r, o in zip(parts, offsets)]),
        truncated=torch.cat([r.truncated for r in parts]),
        old_logps=logps("old_logps"), ref_logps=logps("ref_logps"),
        completions=[c for r in parts for c in r.completions],
        groups_per_prompt=parts[0].groups_per_prompt, step=parts[0].step,
    )


def rollout_from_tokens(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                        pad_token_id: int) -> TextRollout:
    """A rollout of the given (prompt tokens, response tokens) pairs, one row each: prompts left-padded,
    responses right-padded with ``pad_token_id`` (masks 0 there), as :func:`generate` lays a batch out."""
    if len(prompts) != len(responses):
        raise ValueError(f"responses: one per prompt ({len(prompts)}), got {len(responses)}")
    n = len(prompts)
    lp = max([len(p) for p in prompts], default=0)
    lc = max([len(r) for r in responses] + [1])
    prompt_ids = torch.full((n, lp), int(pad_token_id), dtype=torch.long)
    prompt_mask = torch.zeros((n, lp), dtype=torch.long)
    completion_ids = torch.full((n, lc), int(pad_token_id), dtype=torch.long)
    completion_mask = torch.zeros((n, lc), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if len(p):
            prompt_ids[i, lp - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            prompt_mask[i, lp - len(p):] = 1
        if len(r):
            completion_ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            completion_mask[i, :len(r)] = 1
    return TextRollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                       completion_mask=completion_mask, prompt_index=torch.arange(n),
                       truncated=torch.zeros(n, dtype=torch.bool))


def completion_mask_from_ids(completion_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """(mask, truncated): mask is 1 up to and including the first EOS of each row; rows without an
    EOS are ``truncated`` and keep every generated token."""
    is_eos = completion_ids == eos_token_id
    any_eos = is_eos.any(dim=1)
    first = torch.where(any_eos, is_eos.int().argmax(dim=1), torch.full_like(any_eos, completion_ids.shape[1], dtype=torch.long))
    pos = torch.arange(completion_ids.shape[1], device=completion_ids.device).unsqueeze(0)
    mask = (pos <= first.unsqueeze(1)).long()
    return mask, ~any_eos


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, group_size: Union[int, Sequence[int]], max_new_tokens: int, seed: int,
             prompt_keys: Optional[Sequence] = None, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None) -> TextRollout:
    """Sample ``group_size`` completions for every prompt (rows grouped: prompt i -> rows
    i*G .. i*G+G-1), or ``group_size[i]`` for prompt i when it is a list (per-prompt budgets). Row j
    of prompt i draws from ``flowrl.core.rng.generator(seed, "sample", *key_i, j)``
    where ``key_i`` is ``prompt_keys[i]``: a tuple of ints and strings, or one of them (default: the
    prompt text). The training loop's keys are ``(step, record index, position)``."""
    if not prompts:
        raise ValueError("prompts: empty")
    sizes = [group_size] * len(prompts) if isinstance(group_size, int) else [int(g) for g in group_size]
    if len(sizes) != len(prompts) or min(sizes) < 1:
        raise ValueError(f"group_size: must be >= 1 (or one such per prompt), got {group_size}")
    keys = list(prompt_keys) if prompt_keys is not None else list(prompts)
    rows = [p for p, g in zip(prompts, sizes) for _ in range(g)]
    keys = [k if isinstance(k, tuple) else (k,) for k in keys]
    gens = [rng.generator(seed, "sample", *keys[i], j) for i in range(len(prompts)) for j in range(sizes[i])]
    enc = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, num_beams=1,
            max_new_tokens=max_new_tokens, logits_processor=[GumbelSampler(gens, temperature, top_k, top_p)],
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1]:]
    if completion_ids.shape[1] == 0:
        completion_ids = torch.full((len(rows), 1), tokenizer.eos_token_id, dtype=torch.long, device=device)
    mask, truncated = completion_mask_from_ids(completion_ids, tokenizer.eos_token_id)
    completion_ids = torch.where(mask.bool(), completion_ids, torch.full_like(completion_ids, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    return TextRollout(
        prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(), completion_ids=completion_ids.cpu(),
        completion_mask=mask.cpu(), prompt_index=torch.arange(len(prompts)).repeat_interleave(torch.tensor(sizes)),
        truncated=truncated.cpu(), completions=texts,
    )


def token_logps(model, input_ids: Tensor, attention_mask: Tensor, num_completion_tokens: int, *,
                temperature: float = 1.0, chunk_size: Optional[int] = None, with_entropy: bool = False):
    """Log-probs ``[N, Lc]`` of the last ``num_completion_tokens`` tokens of each row:
    ``log_softmax(logits_t / temperature)[token_{t+1}]``, computed ``chunk_size`` rows at a time
    (the graph is kept when grad is enabled). Position ids follow the attention mask, so left
    padding does not shift positions. ``with_entropy``: also the entropy of each position's
    distribution, ``H_t = -sum_v p_v log p_v`` of the same ``softmax(logits_t / temperature)``
    (detached, ``[N, Lc]``), returned as ``(logps, entropy)``."""
    n = input_ids.shape[0]
    chunk = n if not chunk_size else int(chunk_size)
    device = next(model.parameters()).device
    outs, ents = [], []
    for s in range(0, n, chunk):
        ids = input_ids[s:s + chunk].to(device)
        am = attention_mask[s:s + chunk].to(device)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos, logits_to_keep=num_completion_tokens + 1).logits
        logits = logits[:, :-1, :].float() / temperature
        targets = ids[:, -num_completion_tokens:]
        logp_all = torch.log_softmax(logits, dim=-1)
        outs.append(logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1))
        if with_entropy:  # entr(p) = -p log p, 0 at p = 0 (a -inf logit gives no NaN)
            ents.append(torch.special.entr(logp_all.detach().exp()).sum(-1))
    if with_entropy:
        return torch.cat(outs, dim=0), torch.cat(ents, dim=0)
    return torch.cat(outs, dim=0)


def embedding_grad_norms(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor, *,
                         temperature: float = 1.0, chunk_size: Optional[int] = None) -> Tensor:
    """``[N]`` float64: per row, ``||d(-sum_t log pi(y_t)) / dE||_F`` over its completion tokens, ``E`` the
    model's input embedding matrix, the ``G_i`` of GVM-RAFT (arXiv 2505.02391; RLHFlow/GVM d640a75
    ``em/stage_2_calc_acceptRates_grads.py`` ``calc_grad_logp`` with ``act_params=embed_tokens``: one
    backward per sample). Here one backward per chunk: rows do not interact, so a row's gradient of ``E`` is
    its own ``dL/d(inputs_embeds)`` added onto its tokens' rows, plus ``(dL/dlogits)^T h`` (the output
    projection's input ``h``) when the output projection is ``E`` itself (tied embeddings), as
    ``autograd.grad(loss, E)`` of one row gives. Log-probs as :func:`token_logps` (``logits / temperature``);
    the model's parameter gradients are not touched."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    n, lc = input_ids.shape[0], completion_mask.shape[1]
    chunk = n if not chunk_size else int(chunk_size)
    device = emb.weight.device
    norms = []
    for s in range(0, n, chunk):
        ids = input_ids[s:s + chunk].to(device)
        am = attention_mask[s:s + chunk].to(device)
        cm = completion_mask[s:s + chunk].to(device)
        x = emb(ids).detach().requires_grad_(True)
        seen = {}
        hook = out.register_forward_hook(lambda m, a, o: seen.update(h=a[0], o=o)) if tied else None
        try:
            with torch.enable_grad():
                logits = model(inputs_embeds=x, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0),
                               logits_to_keep=lc + 1).logits
                logp = torch.log_softmax(logits[:, :-1, :].float() / temperature, dim=-1)
                taken = logp.gather(-1, ids[:, -lc:].unsqueeze(-1)).squeeze(-1)
                loss = -(taken * cm).sum()
                grads = torch.autograd.grad(loss, [x, seen["o"]] if tied else [x])
        finally:
            if hook is not None:
                hook.remove()
        for r in range(ids.shape[0]):  # this row's gradient of E, [V, H]
            g = torch.zeros(emb.weight.shape, dtype=torch.float64, device=device)
            g.index_add_(0, ids[r], grads[0][r].double())
            if tied:
                g += grads[1][r].double().transpose(0, 1) @ seen["h"][r].detach().double()
            norms.append(torch.linalg.vector_norm(g))
    return torch.stack(norms).cpu() if norms else torch.zeros(0, dtype=torch.float64)
