"""The distillation losses, pure functions of student outputs and teacher targets.

    kd    T²·KL(teacher_T ‖ student_T)                                (Hinton et al., 2015)
    pkd   Σ_pairs mean ‖h_s/‖h_s‖ − h_t/‖h_t‖‖² on chosen layers       (Sun et al., 2019)
    attn  mean over heads and real query tokens of KL(A_t ‖ A_s), the last layers' self-attention
          distributions                                              (MiniLM, Wang et al., 2020)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from squeeze.compress.teacher_cache import TargetSpec, Targets


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1)


def kd_loss(student_logits, teacher_logits, temperature: float, mask=None) -> torch.Tensor:
    """T²·KL(p_teacher ‖ p_student) at temperature T, averaged over examples (or attended tokens).
    The T² keeps the gradient's scale independent of T (Hinton et al.)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return t * t * masked_mean(kl, mask)


def topk_kd_loss(student_logits, top_logprobs, top_indices, temperature: float, mask=None) -> torch.Tensor:
    """The same KL over the teacher's top-k tokens plus one bucket holding every other token.

    `top_logprobs` are the teacher's log-probabilities at temperature T over its whole vocabulary, so
    the bucket's mass is known exactly: the loss is a true KL (zero when student = teacher) between
    the two distributions coarsened to k+1 outcomes, and it stays bounded in size (k per token)."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_indices.long())
    log_p = top_logprobs.float()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rest_p = (-torch.expm1(torch.logsumexp(log_p, -1))).clamp_min(0)
    rest_q = (-torch.expm1(torch.logsumexp(log_q, -1))).clamp_min(1e-12)
    kl = kl + torch.xlogy(rest_p, rest_p) - rest_p * rest_q.log()
    return t * t * masked_mean(kl, mask)


def hidden_loss(student_hidden, teacher_hidden, mask=None) -> torch.Tensor:
    """PKD's patient loss on [B, (T,) P, H] hidden states: for each of the P layer pairs, the squared
    distance between the L2-normalised vectors, averaged over examples (or attended tokens); summed
    over the pairs."""
    s = F.normalize(student_hidden.float(), dim=-1)
    t = F.normalize(teacher_hidden.float(), dim=-1)
    return masked_mean((s - t).pow(2).sum(-1).sum(-1), mask)


def attention_loss(student_attention, teacher_attention, attention_mask) -> torch.Tensor:
    """MiniLM's self-attention transfer: KL(teacher row ‖ student row) for every head and every real query
    token of [B, heads, T, T] attention probabilities, averaged. Padded keys hold no probability on
    either side; padded queries are left out."""
    p = teacher_attention.float()
    log_q = student_attention.float().clamp_min(1e-12).log()
    kl = (torch.xlogy(p, p) - p * log_q).sum(-1).mean(1)  # [B, T]: summed over keys, averaged over heads
    return masked_mean(kl, attention_mask)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last attended token (left or right padding alike)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def pick_hidden(hidden_states: Sequence[torch.Tensor], layers: Sequence[int], attention_mask, spec: TargetSpec):
    """The chosen layers' hidden states, [B, T, P, H] for token tasks, [B, P, H] at the pooled position
    for sequence tasks: [CLS] for encoders, the last real token for decoders (what their head reads)."""
    stacked = torch.stack([hidden_states[i] for i in layers], dim=-2)
    if spec.level == "token":
        return stacked
    if spec.pool == "first":
        return stacked[:, 0]
    return stacked[torch.arange(stacked.shape[0], device=stacked.device), last_token_index(attention_mask)]


def loss_parts(student_out, targets: Targets, batch: dict, spec: TargetSpec, alpha: float, beta: float,
               task_loss: torch.Tensor | None = None, gamma: float = 0.0) -> dict:
    """The training loss and its parts: task, kd, (pkd) hidden and (gamma > 0) attention. `task_loss`: the
    task's own training loss when it is more than the head's (the dialog task's LM + next-utterance loss);
    default the head's."""
    mask = batch["attention_mask"] if spec.level == "token" else None
    task = student_out.loss if task_loss is None else task_loss
    parts = {"loss_task": task}
    total = (1 - alpha) * task
    if targets.top_indices is not None:
        parts["loss_kd"] = topk_kd_loss(student_out.logits, targets.top_logprobs, targets.top_indices,
                                        spec.temperature, mask)
    elif targets.logits is not None:
        parts["loss_kd"] = kd_loss(student_out.logits, targets.logits, spec.temperature, mask)
    elif alpha > 0:
        raise ValueError("alpha > 0 needs the teacher's logits or top-k log-probs")
    if "loss_kd" in parts:
        total = total + alpha * parts["loss_kd"]
    if spec.hidden:
        student_hidden = pick_hidden(student_out.hidden_states, spec.student_layers, batch["attention_mask"], spec)
        parts["loss_hidden"] = hidden_loss(student_hidden, targets.hidden, mask)
        total = total + beta * parts["loss_hidden"]
    if spec.attention:
        parts["loss_attention"] = attention_loss(student_out.attentions[-1], targets.attention,
                                                 batch["attention_mask"])
        total = total + gamma * parts["loss_attention"]
    return {"loss": total, **parts}
