"""One training step's forward math: the distillation step, and the MLM-only step that pre-trains a teacher.

Shape legend: B batch, T sequence length, V vocabulary, D hidden size.
No Ray, no rank checks and no logging here: the loop owns those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline import families, losses
from pipeline.config import LossSection
from pipeline.masking import IGNORE_INDEX


@dataclass(frozen=True)
class Batch:
    """One masked micro-batch: three B×T tensors on one device (int64 in the loop).

    ``packed``: every position is a real token (the attention mask is all ones), known on the host when the batch
    was read (pipeline/batches.py), so the models run without an attention mask (SDPA's unmasked kernels) and
    nothing on the device has to be asked.
    """

    input_ids_BT: torch.Tensor  # after masking
    attention_mask_BT: torch.Tensor
    labels_BT: torch.Tensor  # original ids at chosen positions, -100 elsewhere
    packed: bool = False

    @property
    def model_attention_mask(self) -> torch.Tensor | None:
        """What the models are given: None for a packed batch, else the B×T mask."""
        return None if self.packed else self.attention_mask_BT


def kd_mask(batch: Batch, kd_positions: str) -> torch.Tensor:
    """B×T bool: the positions L_ce and L_cos (and L_mse) are taken over. "masked": the MLM-chosen positions
    (labels ≠ -100; HF distiller's ``restrict_ce_to_mask``); any other value ("all"): every real token,
    [CLS]/[SEP] included (the attention mask, HF's default)."""
    if kd_positions == "masked":
        return batch.labels_BT != IGNORE_INDEX
    return batch.attention_mask_BT.bool()


def encode(model: torch.nn.Module, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None):
    """(last hidden state B×T×D, LM logits B×T×V) of a masked LM of any family, called through its encoder and
    head (pipeline/families/): no tuple of every layer's hidden states (``output_hidden_states``), no output
    dataclass. For a frozen model (the teacher) or the inside of an engine; a trained model under DDP must be
    called through its wrapper."""
    m = model.module if hasattr(model, "module") else model
    family = families.of(m)
    hidden_BTD = family.encoder(m)(input_ids=input_ids_BT, attention_mask=attention_mask_BT).last_hidden_state
    return hidden_BTD, family.lm_logits(m, hidden_BTD)


def count_supervised(batch: Batch, kd_positions: str) -> torch.Tensor:
    """Local counts [N_ce, N_mlm] of one micro-batch: the loop sums them over micro-batches and ranks."""
    n_ce = kd_mask(batch, kd_positions).sum()
    n_mlm = (batch.labels_BT != IGNORE_INDEX).sum()
    return torch.stack([n_ce, n_mlm]).float()


def distill_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: Batch,
    *,
    loss_cfg: LossSection,
    norm_ce: torch.Tensor | float | None = None,
    norm_mlm: torch.Tensor | float | None = None,
    fused: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Teacher forward (frozen, no grad), student forward, the weighted triple loss: ``(loss, {"loss/<term>": …})``.

    L_ce and L_mlm are one fused pass over the vocabulary (:func:`pipeline.losses.kd_mlm_loss`, its gradient made
    in the forward); ``fused=False`` computes them apart (:func:`~pipeline.losses.ce_loss`,
    :func:`~pipeline.losses.mlm_loss`: the reference, and the "before" of benchmarks/gpu_mfu.py).
    No host sync and static shapes, so ``torch.compile(..., fullgraph=True)`` takes it whole (fused): the teacher
    runs through its submodules (:func:`encode`), a packed batch without an attention mask, and every loss takes
    its positions as a dense B×T mask, never by boolean indexing.
    """
    with torch.no_grad():
        t_hidden_BTD, t_logits_BTV = encode(teacher, batch.input_ids_BT, batch.model_attention_mask)
    # Through the engine's own forward (DeepSpeed's and DDP's hooks); the last hidden state is the last entry of
    # hidden_states, which the student's backward keeps alive anyway.
    s_out = student(input_ids=batch.input_ids_BT, attention_mask=batch.model_attention_mask, output_hidden_states=True)
    s_hidden_BTD, s_logits_BTV = s_out.hidden_states[-1], s_out.logits
    mask_BT = kd_mask(batch, loss_cfg.kd_positions)
    weights = {"ce": loss_cfg.alpha_ce, "mlm": loss_cfg.alpha_mlm, "cos": loss_cfg.alpha_cos, "mse": loss_cfg.alpha_mse}
    terms = {"cos": losses.cosine_loss(s_hidden_BTD, t_hidden_BTD.to(s_hidden_BTD.dtype), mask_BT, normalizer=norm_ce)}
    if loss_cfg.alpha_mse > 0:
        terms["mse"] = losses.mse_loss(s_logits_BTV, t_logits_BTV, mask_BT, normalizer=norm_ce)
    if not fused:
        terms["ce"] = losses.ce_loss(s_logits_BTV, t_logits_BTV, mask_BT, temperature=loss_cfg.temperature,
                                     normalizer=norm_ce)
        terms["mlm"] = losses.mlm_loss(s_logits_BTV, batch.labels_BT, normalizer=norm_mlm)
        return losses.combine(terms, weights)
    kd_mlm, ce, mlm = losses.kd_mlm_loss(s_logits_BTV, t_logits_BTV, batch.labels_BT, mask_BT,
                                         temperature=loss_cfg.temperature, alpha_ce=loss_cfg.alpha_ce,
                                         alpha_mlm=loss_cfg.alpha_mlm, norm_ce=norm_ce, norm_mlm=norm_mlm)
    total = kd_mlm + sum(weights[name] * value for name, value in terms.items() if weights[name] > 0)
    metrics = {"loss/ce": ce, "loss/mlm": mlm, **{f"loss/{name}": value.detach() for name, value in terms.items()}}
    return total, {**metrics, "loss/total": total.detach()}


def mlm_step(
    model: torch.nn.Module, batch: Batch, *, norm_mlm: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked-LM training of a masked LM of any family: the distillation step with L_ce and L_cos switched off.

    Only ~15 % of positions carry a label, so the vocabulary projection (the largest matmul at a small
    width) runs on those positions alone: N×D @ D×V instead of B·T×D @ D×V.
    """
    m = model.module if hasattr(model, "module") else model  # unwrap a DeepSpeed engine
    family = families.of(m)
    selected_BT = batch.labels_BT != IGNORE_INDEX
    hidden_BTD = family.encoder(m)(input_ids=batch.input_ids_BT, attention_mask=batch.model_attention_mask).last_hidden_state
    logits_NV = family.lm_logits(m, hidden_BTD[selected_BT])
    mlm = losses.mlm_loss(logits_NV.unsqueeze(0), batch.labels_BT[selected_BT].unsqueeze(0), normalizer=norm_mlm)
    return losses.combine({"mlm": mlm}, {"mlm": 1.0})


@torch.no_grad()
def eval_sums(model: torch.nn.Module, teacher: torch.nn.Module | None, batch: Batch) -> torch.Tensor:
    """Sums for held-out metrics, float [4] on the batch's device: [masked CE sum (nats), masked correct, masked
    count, teacher-agreement count (0 without a teacher)].

    Dense over positions (no boolean indexing, no host sync), so every term lives on the logits' device and the
    shapes are static: a position whose label is −100 adds exactly 0 to every sum.
    """
    logits_BTV = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits.float()
    selected_BT = batch.labels_BT != IGNORE_INDEX
    ce_sum = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), batch.labels_BT.flatten(), reduction="sum",
                                               ignore_index=IGNORE_INDEX)
    pred_BT = logits_BTV.argmax(-1)
    correct = ((pred_BT == batch.labels_BT) & selected_BT).sum()
    agree = torch.zeros((), dtype=torch.long, device=logits_BTV.device)
    if teacher is not None:
        t_logits_BTV = teacher(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        agree = ((t_logits_BTV.argmax(-1) == pred_BT) & selected_BT).sum()
    return torch.stack([ce_sum, correct.float(), selected_BT.sum().float(), agree.float()])
