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

:func:`kd_mlm_loss` computes α_ce · L_ce + α_mlm · L_mlm in one pass over the vocabulary per block of rows, with
the same values as :func:`ce_loss` and :func:`mlm_loss` (dense weights, no host sync).
"""

from __future__ import annotations

import warnings

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


# Elements per chunk: small on CPU so a chunk's passes stay in cache (16 rows of a 30k
# vocabulary), large on GPU so kernel launches stay few.
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


def kd_mlm_loss(
    student_logits_BTV: torch.Tensor,
    teacher_logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    kd_weight_BT: torch.Tensor,
    *,
    temperature: float,
    alpha_ce: float,
    alpha_mlm: float,
    norm_ce: float | torch.Tensor | None,
    norm_mlm: float | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_ce and L_mlm fused: ``(weighted, ce, mlm)`` with ``weighted = α_ce · L_ce + α_mlm · L_mlm``.

    The same values as :func:`ce_loss` and :func:`mlm_loss` (Hinton et al. 2015, eq. 2; DistilBERT §2), dense:
        L_ce  = T² · Σ_i w_i · KL(softmax(t_i/T) ‖ softmax(s_i/T)) / norm_ce
        L_mlm = Σ_i −log softmax(s_i)[y_i] / norm_mlm                       (over y_i ≠ −100)
    Shapes: logits B×T×V of any float dtype (the teacher's is detached), ``labels_BT`` int (−100: no label),
    ``kd_weight_BT`` B×T of 0/1 (float or bool: the KD mask). A norm is a float or a 0-d tensor (a constant: no
    gradient flows to it); ``None`` averages over the local count (positions with w ≠ 0, labels ≠ −100; at
    least 1). A term whose α is not > 0 is left out of ``weighted`` but still reported, as :func:`combine` does.

    ``weighted`` is differentiable w.r.t. the student logits; ``ce`` and ``mlm`` are fp32 0-d metrics without
    gradient. One pass over the vocabulary per block of rows (:data:`KD_BLOCK_ELEMS`), in fp32 inside the block
    only, computes both terms and the gradient, written into one buffer of the student's dtype: no N×V fp32
    copy, no saved logits, no host sync. The −inf conventions are :func:`ce_loss`'s (and ``F.cross_entropy``'s
    for L_mlm); a position with w = 0 and no label adds exactly 0, whatever its logits (NaN included).
    Errors: a label outside [0, V) other than −100 raises (the gather's bounds check; a device assert on GPU).
    The backward may run more than once (``retain_graph=True``): it scales the buffer out of place.
    """
    vocab = student_logits_BTV.shape[-1]
    w_N = kd_weight_BT.reshape(-1).to(torch.float32)
    y_N = labels_BT.reshape(-1)
    labelled_N = y_N != IGNORE_INDEX
    norm_ce = _dense_norm(norm_ce, (w_N != 0).sum())
    norm_mlm = _dense_norm(norm_mlm, labelled_N.sum())
    # Per-row gradient factors: ∂(α_ce·L_ce)/∂s_i = α_ce·T·w_i/norm_ce · (softmax(s_i/T) − p_t,i).
    a_ce, a_mlm = (float(a) if a > 0 else 0.0 for a in (alpha_ce, alpha_mlm))
    gce_N = torch.where(w_N != 0, w_N * (a_ce * temperature) / norm_ce, 0.0)  # a tensor division: norm 0 is inf
    gmlm_N = torch.where(labelled_N, torch.full_like(w_N, a_mlm) / norm_mlm, 0.0)
    return _FusedKDMLM.apply(
        student_logits_BTV.reshape(-1, vocab), teacher_logits_BTV.detach().reshape(-1, vocab), y_N, w_N, gce_N,
        gmlm_N, (float(temperature), a_ce, a_mlm, norm_ce, norm_mlm),
    )


# Elements per block of the fused loss: small on CPU so a block's passes stay in cache, large on GPU so kernel
# launches stay few. Rows are rounded down to a multiple of 8 (16-byte-aligned block starts for the compiler).
KD_BLOCK_ELEMS = {"cpu": 2**19, "cuda": 2**26}
# False runs the block math eagerly (tests, debugging); a failed compile turns it off, with one warning.
COMPILE_BLOCKS = True
_compiled_block = None


class _FusedKDMLM(torch.autograd.Function):
    """(weighted, ce, mlm) of :func:`kd_mlm_loss`; the forward computes the gradient, the backward scales it."""

    @staticmethod
    def forward(ctx, s_NV, t_NV, y_N, w_N, gce_N, gmlm_N, consts):
        temperature, a_ce, a_mlm, norm_ce, norm_mlm = consts
        kl_sum, nll_sum, grad_NV = _blockwise(s_NV, t_NV, y_N, w_N, gce_N, gmlm_N, temperature)
        ce, mlm = kl_sum * temperature**2 / norm_ce, nll_sum / norm_mlm
        weighted = torch.zeros((), dtype=torch.float32, device=s_NV.device)
        for alpha, term in ((a_ce, ce), (a_mlm, mlm)):
            if alpha > 0:
                weighted = weighted + alpha * term
        ctx.save_for_backward(grad_NV)
        ctx.mark_non_differentiable(ce, mlm)
        return weighted, ce, mlm

    @staticmethod
    def backward(ctx, grad_weighted, _grad_ce, _grad_mlm):
        (grad_NV,) = ctx.saved_tensors
        return grad_weighted * grad_NV, None, None, None, None, None, None


def _blockwise(s_NV, t_NV, y_N, w_N, gce_N, gmlm_N, temperature: float):
    """Σ_i w_i·KL_i, Σ_i nll_i (fp32 0-d) and the N×V gradient (s's dtype), one row block at a time. The last,
    short block runs padded to the block's shape (weight 0, label −100), so the compiler sees at most two."""
    num_rows, vocab = s_NV.shape
    rows = min(_block_rows(vocab, s_NV.device), max(num_rows, 1))
    inv_t = torch.full((), 1.0 / temperature, dtype=torch.float32, device=s_NV.device)
    grad_NV = torch.empty(s_NV.shape, dtype=s_NV.dtype, device=s_NV.device)
    kl_sums, nll_sums = [], []
    for start in range(0, num_rows, rows):
        n = min(rows, num_rows - start)
        ins = [x[start : start + n] for x in (s_NV, t_NV, y_N, w_N, gce_N, gmlm_N)]
        out_RV = grad_NV[start : start + n]
        if n < rows:
            ins = [_pad_rows(x, rows, IGNORE_INDEX if x.dtype == y_N.dtype else 0) for x in ins]
            out_RV = grad_NV.new_empty(rows, vocab)
        kl, nll = _run_block(*ins, inv_t, out_RV)
        if n < rows:
            grad_NV[start : start + n] = out_RV[:n]
        kl_sums.append(kl)
        nll_sums.append(nll)
    if not kl_sums:
        zero = torch.zeros((), dtype=torch.float32, device=s_NV.device)
        return zero, zero.clone(), grad_NV
    return torch.stack(kl_sums).sum(), torch.stack(nll_sums).sum(), grad_NV


def _block_rows(vocab: int, device: torch.device) -> int:
    rows = max(1, KD_BLOCK_ELEMS.get(device.type, 2**26) // max(vocab, 1))
    return rows - rows % 8 if rows >= 8 else rows


def _pad_rows(x: torch.Tensor, rows: int, fill) -> torch.Tensor:
    return torch.cat([x, x.new_full((rows - x.shape[0], *x.shape[1:]), fill)])


def _run_block(*args):
    """The block math, compiled on first use (never at import); eager when switched off or inside a caller's
    own ``torch.compile`` (which then fuses it). A failing compile falls back to eager with one warning, unless
    eager fails too (then the inputs are at fault and eager's error is raised)."""
    global _compiled_block, COMPILE_BLOCKS
    if not COMPILE_BLOCKS or torch.compiler.is_compiling():
        return _kd_mlm_block(*args)
    if _compiled_block is None:
        _compiled_block = torch.compile(_kd_mlm_block, dynamic=False)
    try:
        return _compiled_block(*args)
    except Exception as err:
        out = _kd_mlm_block(*args)
        COMPILE_BLOCKS = False
        warnings.warn(f"torch.compile of the fused KD+MLM loss failed, running it eagerly: {type(err).__name__}: "
                      f"{str(err)[:500]}", RuntimeWarning, stacklevel=2)
        return out


def _kd_mlm_block(s_RV, t_RV, y_R, w_R, gce_R, gmlm_R, inv_t, grad_RV):
    """One block of R rows: returns (Σ w·KL, Σ nll) as fp32 0-d and writes the gradient into ``grad_RV``."""
    s, t = s_RV.float(), t_RV.float()
    st, tt = s * inv_t, t * inv_t
    # Compiled, one kernel per block: it reads each row (from cache) for the maxima, the exp-sums and cross term,
    # and the gradient; the logits come from memory once per block.
    max_s = s.amax(-1, keepdim=True)
    max_st, max_tt = max_s * inv_t, tt.amax(-1, keepdim=True)  # max(s/T) = max(s)/T: rounding is monotonic
    lse_s = max_s + (s - max_s).exp().sum(-1, keepdim=True).log()
    lse_st = max_st + (st - max_st).exp().sum(-1, keepdim=True).log()
    e_t = (tt - max_tt).exp()
    z_t = e_t.sum(-1, keepdim=True)
    # 0 · anything = 0, as in F.kl_div (xlogy): where p_t = 0 (a −inf teacher logit) t − s may be NaN.
    cross_R1 = torch.where(e_t > 0, e_t * (tt - st), 0.0).sum(-1, keepdim=True) / z_t
    kl_R1 = cross_R1 - (max_tt + z_t.log()) + lse_st
    p_t = e_t / z_t
    nll_R1 = lse_s - s.gather(-1, y_R.clamp(min=0).unsqueeze(-1))
    onehot = torch.arange(s.shape[-1], device=s.device) == y_R.unsqueeze(-1)
    gce_R1, gmlm_R1 = gce_R.unsqueeze(-1), gmlm_R.unsqueeze(-1)
    # torch.where, not a product: a row with factor 0 (weight 0, no label, α = 0) adds 0 even if it holds NaN.
    grad = torch.where(gce_R1 != 0, gce_R1 * ((st - lse_st).exp() - p_t), 0.0)
    grad = grad + torch.where(gmlm_R1 != 0, gmlm_R1 * ((s - lse_s).exp() - onehot.float()), 0.0)
    grad_RV.copy_(grad)
    kl = torch.where(w_R.unsqueeze(-1) != 0, w_R.unsqueeze(-1) * kl_R1, 0.0).sum()
    nll = torch.where((y_R != IGNORE_INDEX).unsqueeze(-1), nll_R1, 0.0).sum()
    return kl, nll


def _dense_norm(normalizer, local_count: torch.Tensor):
    """A float stays a float (no host-to-device copy); a tensor is a constant; None: the local count, at least 1."""
    if normalizer is None:
        return local_count.clamp(min=1).to(torch.float32)
    if isinstance(normalizer, torch.Tensor):
        return normalizer.detach().to(torch.float32)
    return float(normalizer)


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
