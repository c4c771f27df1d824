"""The DistilBERT triple loss (Sanh et al. 2019, §2-3), as pure functions.

Shape legend: B batch, T sequence length, V vocabulary, D hidden size, N selected positions.

    L = α_ce · L_ce + α_mlm · L_mlm + α_cos · L_cos

    L_ce  = T² · Σ_i KL(softmax(t_i / T) ‖ softmax(s_i / T)) / N_ce     (Hinton et al. 2015, eq. 2; DistilBERT §2)
    L_mlm = Σ_i −log softmax(s_i)[y_i] / N_mlm                          (over labels ≠ −100)
    L_cos = Σ_i (1 − cos(h^s_i, h^t_i)) / N_ce                           (DistilBERT §3, last hidden states)

Normalisation. N_ce and N_mlm are the *global* counts of supervised positions in one optimizer step, summed
over every rank and every micro-batch. Each function returns ``Σ_i ℓ_i / normalizer``. DeepSpeed owns the
averaging of gradients: it divides by the accumulation steps A and averages over the W data-parallel ranks.
So the step passes ``normalizer = N_global / (W · A)``, and the gradient DeepSpeed applies is exactly
``∇ Σ_{ranks, micro-batches} Σ_i ℓ_i / N_global``: every supervised token weighs the same, whatever its
micro-batch or rank. With ``normalizer=None`` a function averages over its own positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.masking import IGNORE_INDEX


def ce_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    temperature: float,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation (KD) term L_ce: KL(softmax(t/T) ‖ softmax(s/T)) · T², summed over positions where
    ``mask_BT`` is true. One name everywhere: ``ce`` (the paper's L_ce, HF's ``alpha_ce``/``loss_ce``), so the
    config weight is ``loss.alpha_ce``, the metric ``loss/ce`` and its normaliser N_ce.

    Computed by :class:`_ChunkedKL` in row chunks, so that no N×V intermediate is kept for backward and each
    chunk's passes stay in cache. Per position, with lse the log-sum-exp:
        KL = Σ_v p_t,v · (t_v − s_v) / T − lse(t/T) + lse(s/T),     ∂KL/∂s = (softmax(s/T) − p_t) / T.

    −inf logits (a masked vocabulary entry, an fp16 overflow) follow ``F.kl_div``'s convention 0 · log 0 = 0:
    a vocabulary entry the teacher gives probability 0 adds nothing to the loss or the gradient, whatever
    the student's logit there (−inf included, where ``F.kl_div`` itself gives NaN). A student logit of −inf
    where the teacher's probability is positive gives +inf, the true value. A teacher row with no finite
    logit, and +inf or NaN logits, are not distributions: the result is NaN, which the loop's numerics guard
    reports with the step and the term.
    """
    s_NV, t_NV = _select(student_logits_BTV, mask_BT), _select(teacher_logits_BTV.detach(), mask_BT)
    kl_sum = _ChunkedKL.apply(s_NV, t_NV, float(temperature))
    return kl_sum * temperature**2 / _norm(normalizer, s_NV.shape[0])


# Elements per chunk: small on CPU so a chunk's passes stay in cache (16 rows of a 30k vocabulary measured
# fastest here), large on GPU so kernel launches stay few.
CE_CHUNK_ELEMS = {"cpu": 2**19, "cuda": 2**26}


def _chunk_rows(x_NV: torch.Tensor) -> int:
    return max(1, CE_CHUNK_ELEMS.get(x_NV.device.type, 2**26) // max(x_NV.shape[-1], 1))


class _ChunkedKL(torch.autograd.Function):
    """Σ_i KL(softmax(t_i/T) ‖ softmax(s_i/T)) with a recomputing backward (saves only s and t)."""

    @staticmethod
    def forward(ctx, s_NV: torch.Tensor, t_NV: torch.Tensor, temperature: float) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=s_NV.device)
        rows = _chunk_rows(s_NV)
        for start in range(0, s_NV.shape[0], rows):
            s = s_NV[start : start + rows].float() / temperature
            t = t_NV[start : start + rows].float() / temperature
            p_t = torch.log_softmax(t, dim=-1).exp()
            # 0 · anything = 0, as in F.kl_div (xlogy): a −inf teacher logit (a masked vocabulary entry) has
            # p_t = 0, and t − s is NaN there (−inf − s, or −inf − −inf when the student masks it too).
            cross = torch.where(p_t > 0, p_t * (t - s), 0.0)
            total += cross.sum() - (torch.logsumexp(t, -1) - torch.logsumexp(s, -1)).sum()
        ctx.save_for_backward(s_NV, t_NV)
        ctx.temperature = temperature
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        s_NV, t_NV = ctx.saved_tensors
        temperature = ctx.temperature
        grad_NV = torch.empty_like(s_NV)
        rows = _chunk_rows(s_NV)
        for start in range(0, s_NV.shape[0], rows):
            s = s_NV[start : start + rows].float() / temperature
            t = t_NV[start : start + rows].float() / temperature
            g = (torch.softmax(s, dim=-1) - torch.softmax(t, dim=-1)) * (grad_out / temperature)
            grad_NV[start : start + rows] = g.to(grad_NV.dtype)
        return grad_NV, None, None


def mlm_loss(
    student_logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over the positions whose label is not −100."""
    selected_BT = labels_BT != IGNORE_INDEX
    logits_NV = student_logits_BTV[selected_BT].float()
    ce_sum = F.cross_entropy(logits_NV, labels_BT[selected_BT], reduction="sum")
    return ce_sum / _norm(normalizer, logits_NV.shape[0])


def cosine_loss(
    student_hidden_BTD: torch.Tensor,
    teacher_hidden_BTD: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ (1 − cos) between student and teacher hidden states over positions where ``mask_BT`` is true.

    Each vector is first scaled by a power of two that brings its largest |entry| into [0.5, 1): the cosine
    is unchanged bit for bit (power-of-two scaling is exact), but ‖h‖² no longer overflows float32 for
    entries above ~1e19 (bf16 reaches 3e38), where ``F.cosine_similarity`` would return 0.
    Dense over positions (no boolean indexing, no host sync): every position is computed, and one outside
    ``mask_BT`` adds exactly 0, whatever its hidden states.
    """
    # Zeros outside the mask before any arithmetic: a NaN there must not reach the gradient either (0 · NaN).
    keep_BT1 = mask_BT.unsqueeze(-1)
    s_BTD = _unit_scale(torch.where(keep_BT1, student_hidden_BTD.float(), 0.0))
    t_BTD = _unit_scale(torch.where(keep_BT1, teacher_hidden_BTD.float(), 0.0))
    cos_BT = F.cosine_similarity(s_BTD, t_BTD, dim=-1)
    cos_sum = torch.where(mask_BT, 1.0 - cos_BT, 0.0).sum()
    return cos_sum / _norm(normalizer, mask_BT.sum())


def mse_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    normalizer: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """HF's optional L_mse: Σ_i ‖s_i − t_i‖² / N over positions where ``mask_BT`` is true.

    The squared error is summed over the vocabulary and averaged over positions, exactly as HF's
    ``distiller.py`` (``nn.MSELoss(reduction="sum")(s, t) / N``), so ``alpha_mse`` means what it means there.
    A teacher logit of −inf (a masked vocabulary entry) has no value to match: that entry adds 0, and the KD
    term already drives the student's probability there to 0. A student logit of −inf against a finite teacher
    logit gives +inf, the true value; so does a squared difference beyond float32's range (|s − t| > ~1.8e19).
    Non-finite results are reported by the loop's numerics guard.
    Dense over positions, like :func:`cosine_loss`.
    """
    s_BTV, t_BTV = student_logits_BTV.float(), teacher_logits_BTV.detach().float()
    keep_BTV = mask_BT.unsqueeze(-1) & ~torch.isneginf(t_BTV)
    # The inner where keeps a −inf teacher entry out of the arithmetic, the outer one the student's: an excluded
    # entry gets exactly 0 gradient (not 0 · ∞ = NaN).
    diff_BTV = torch.where(keep_BTV, s_BTV - torch.where(keep_BTV, t_BTV, 0.0), 0.0)
    sq_sum = diff_BTV.square().sum()
    return sq_sum / _norm(normalizer, mask_BT.sum())


def combine(terms: dict[str, torch.Tensor], weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the loss terms. Terms with weight 0 are left out of the sum but still reported."""
    total = sum(weights[name] * value for name, value in terms.items() if weights.get(name, 0.0) > 0)
    metrics = {f"loss/{name}": value.detach() for name, value in terms.items()}
    metrics["loss/total"] = total.detach()
    return total, metrics


def _select(x_BTV: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """x[mask] as N×V; a view rather than a copy when every position is selected (packed rows)."""
    if bool(mask_BT.all()):
        return x_BTV.reshape(-1, x_BTV.shape[-1])
    return x_BTV[mask_BT]


def _unit_scale(x_ND: torch.Tensor) -> torch.Tensor:
    """x scaled per row by 2^-e, e the exponent of its largest |entry| (rows of zeros, inf or NaN unchanged)."""
    _, exponent_N1 = torch.frexp(x_ND.detach().abs().amax(-1, keepdim=True))
    # Clamped so that 2^-e itself is a normal float32 (a subnormal row's e is below −126). Not torch.ldexp:
    # its backward gives a zero gradient (torch 2.13).
    return x_ND * torch.exp2(-exponent_N1.clamp(-126, 126).to(x_ND.dtype))


def _norm(normalizer, local_count: int | torch.Tensor):
    # An empty selection contributes 0, never NaN: clamp the local count at 1 (a tensor stays on its device).
    if normalizer is not None:
        return normalizer
    return local_count.clamp(min=1) if isinstance(local_count, torch.Tensor) else max(local_count, 1)
