import math

import pytest
import torch
import torch.nn.functional as F

from pipeline import losses
from pipeline.masking import IGNORE_INDEX

torch.manual_seed(0)


def _logits(b=2, t=6, v=40):
    return torch.randn(b, t, v, dtype=torch.float64).float()


def test_kd_agrees_with_torch_kl_div_and_has_the_t_squared_factor():
    s, t = _logits(), _logits()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding
    for T in (1.0, 2.0, 4.0):
        ref = F.kl_div(F.log_softmax(s[mask] / T, -1), F.log_softmax(t[mask] / T, -1), log_target=True, reduction="batchmean")
        assert losses.ce_loss(s, t, mask, temperature=T).item() == pytest.approx(ref.item() * T * T, rel=1e-5)


def test_kd_gradient_matches_autograd_of_the_textbook_formula():
    s = _logits().requires_grad_(True)
    t = _logits()
    mask = torch.rand(2, 6) > 0.3
    T = 2.0
    ref = (F.softmax(t[mask] / T, -1) * (F.log_softmax(t[mask] / T, -1) - F.log_softmax(s[mask] / T, -1))).sum(-1).mean() * T * T
    (g_ref,) = torch.autograd.grad(ref, s)
    (g,) = torch.autograd.grad(losses.ce_loss(s, t, mask, temperature=T), s)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_kd_is_zero_for_identical_logits_and_ignores_padding():
    s = _logits()
    mask = torch.ones(2, 6, dtype=torch.bool)
    assert losses.ce_loss(s, s.clone(), mask, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    t = s.clone()
    mask[0, 5] = False
    t[0, 5] += 100.0  # a wild difference at a padded position changes nothing
    assert losses.ce_loss(s, t, mask, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_by_hand_on_two_classes():
    s = torch.tensor([[[0.0, 0.0]]])
    t = torch.tensor([[[math.log(3.0), 0.0]]])  # p_t = (3/4, 1/4) at T=1
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.ce_loss(s, t, torch.ones(1, 1, dtype=torch.bool), temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_mlm_loss_is_cross_entropy_over_labelled_positions_only():
    s = _logits()
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 5, 7
    ref = F.cross_entropy(s.reshape(-1, 40), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert losses.mlm_loss(s, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_cosine_loss_by_hand():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    b = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    assert losses.cosine_loss(a, b, mask).item() == pytest.approx(((1 - 0) + (1 - 1)) / 2)


def test_empty_selection_gives_zero_not_nan():
    s = _logits()
    none = torch.zeros(2, 6, dtype=torch.bool)
    assert losses.ce_loss(s, s, none, temperature=2.0).item() == 0.0
    assert losses.mlm_loss(s, torch.full((2, 6), IGNORE_INDEX)).item() == 0.0


def _global_normalised(chunks, W, A):
    """What one rank's DeepSpeed applies: the mean over ranks and micro-batches of each micro-batch loss."""
    n_global = sum(int(m.sum()) for _, _, m in chunks)
    total = 0.0
    for s, t, m in chunks:
        total += losses.ce_loss(s, t, m, temperature=2.0, normalizer=n_global / (W * A)).item()
    return total / (W * A)


@pytest.mark.parametrize("W,A", [(1, 2), (2, 1), (2, 2)])
def test_global_token_normalisation_equals_one_big_batch(W, A):
    """1 micro-batch vs A, 1 rank vs W: every token weighs the same whatever its micro-batch or rank."""
    s, t = _logits(b=4, t=6), _logits(b=4, t=6)
    mask = torch.rand(4, 6) > 0.4  # uneven token counts per chunk
    whole = losses.ce_loss(s, t, mask, temperature=2.0).item()
    rows = torch.arange(4).chunk(W * A)
    chunks = [(s[r], t[r], mask[r]) for r in rows]
    assert _global_normalised(chunks, W, A) == pytest.approx(whole, rel=1e-5)


def test_combine_weights_terms_and_reports_each():
    terms = {"ce": torch.tensor(1.0), "mlm": torch.tensor(2.0), "cos": torch.tensor(3.0)}
    total, metrics = losses.combine(terms, {"ce": 5.0, "mlm": 2.0, "cos": 0.0})
    assert total.item() == pytest.approx(9.0)
    assert set(metrics) == {"loss/ce", "loss/mlm", "loss/cos", "loss/total"}
    assert metrics["loss/cos"].item() == 3.0


def test_mse_loss_is_hf_scale_squared_error_summed_over_the_vocabulary_and_averaged_over_positions():
    s, t = _logits(), _logits()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 0] = False
    # HF's distiller.py: nn.MSELoss(reduction="sum")(s_slct, t_slct) / s_slct.size(0)
    ref = torch.nn.MSELoss(reduction="sum")(s[mask], t[mask]) / mask.sum()
    assert losses.mse_loss(s, t, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    assert losses.mse_loss(s, s.clone(), mask).item() == 0.0


def test_distill_step_reports_each_term_and_weights_them():
    from pipeline.config import LossSection, StudentSection, TeacherSection
    from pipeline import models
    from pipeline.step import Batch, distill_step

    teacher = models.build_teacher_for_pretraining(
        TeacherSection(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=16),
        vocab_size=40, pad_token_id=0, seed=0).eval()
    student = models.build_student(StudentSection(), teacher, seed=0).eval()
    ids = torch.randint(5, 40, (2, 8))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2] = ids[:, 2]
    batch = Batch(input_ids_BT=ids, attention_mask_BT=torch.ones_like(ids), labels_BT=labels)
    cfg = LossSection(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.5)
    loss, m = distill_step(student, teacher, batch, loss_cfg=cfg)
    expected = 5 * m["loss/ce"] + 2 * m["loss/mlm"] + 1 * m["loss/cos"] + 0.5 * m["loss/mse"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(m) == {"loss/ce", "loss/mlm", "loss/cos", "loss/mse", "loss/total"}


NEG_INF = -math.inf


def _kd_reference(s_NV, t_NV, T):
    """The textbook form through F.kl_div (probability target, so 0 · log 0 = 0), its value and its gradient."""
    s_NV = s_NV.detach().float().requires_grad_(True)
    ref = F.kl_div(F.log_softmax(s_NV / T, -1), F.softmax(t_NV.float() / T, -1), reduction="batchmean") * T * T
    (grad,) = torch.autograd.grad(ref, s_NV)
    return ref, grad


def _teacher_with_masked_entries(dtype=torch.float32):
    t = _logits(b=2, t=6, v=40)
    t[0, 0, [3, 17, 39]] = NEG_INF  # a few masked vocabulary entries
    t[0, 2, :] = NEG_INF
    t[0, 2, 5] = 1.0  # a whole row masked but one entry: a one-hot teacher
    t[1, :, 0] = NEG_INF  # one entry masked at every position (an unused token id)
    t[1, 4, 10:30] = NEG_INF
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kd_with_minus_inf_teacher_logits_agrees_with_kl_div_in_value_and_gradient(dtype, T):
    s = _logits(b=2, t=6, v=40).to(dtype).requires_grad_(True)
    t = _teacher_with_masked_entries(dtype)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 5] = False
    ref, g_ref = _kd_reference(s[mask], t[mask], T)
    assert torch.isfinite(ref)
    loss = losses.ce_loss(s, t, mask, temperature=T)
    (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert g.dtype == dtype
    assert torch.allclose(g[mask].float(), g_ref, atol=1e-6 if dtype == torch.float32 else 1e-3)
    assert not g[~mask].any()


def test_kd_student_minus_inf_where_the_teacher_has_probability_zero_adds_nothing():
    """F.kl_div itself gives NaN here (0 · −inf); the right value drops the entry from both distributions."""
    s = _logits(b=1, t=3, v=10).requires_grad_(True)
    t = _logits(b=1, t=3, v=10)
    t[0, :, 4] = NEG_INF
    s_masked = s.detach().clone()
    s_masked[0, :, 4] = NEG_INF
    s_masked.requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    keep = [v for v in range(10) if v != 4]
    ref, g_ref = _kd_reference(s.detach()[0][:, keep], t[0][:, keep], 2.0)
    loss = losses.ce_loss(s_masked, t, mask, temperature=2.0)
    (g,) = torch.autograd.grad(loss, s_masked)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g[0][:, keep], g_ref, atol=1e-6)
    assert not g[0, :, 4].any()


def test_kd_student_minus_inf_where_the_teacher_has_probability_is_plus_inf_with_a_finite_gradient():
    s = _logits(b=1, t=2, v=10)
    s[0, 1, 7] = NEG_INF
    s.requires_grad_(True)
    t = _logits(b=1, t=2, v=10)
    loss = losses.ce_loss(s, t, torch.ones(1, 2, dtype=torch.bool), temperature=2.0)
    (g,) = torch.autograd.grad(loss, s)
    assert loss.item() == math.inf
    expected = (F.softmax(s.detach() / 2.0, -1) - F.softmax(t / 2.0, -1)) / 2.0 * 4.0 / 2  # ∂/∂s of T²·ΣKL/N
    assert torch.allclose(g, expected, atol=1e-6)


def test_kd_ignores_an_all_minus_inf_teacher_row_at_a_padded_position():
    s, t = _logits(), _logits()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 3] = False
    expected = losses.ce_loss(s, t, mask, temperature=2.0).item()
    t[0, 3] = NEG_INF  # no distribution at all, but padding
    assert losses.ce_loss(s, t, mask, temperature=2.0).item() == expected


def test_mlm_loss_with_minus_inf_logits_agrees_with_cross_entropy():
    s = _logits()
    s[0, 1, [0, 9, 33]] = NEG_INF  # masked entries that are not the label
    s[1, :, 2] = NEG_INF
    s.requires_grad_(True)
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 5, 7
    ref = F.cross_entropy(s.reshape(-1, 40), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    (g_ref,) = torch.autograd.grad(ref, s)
    loss = losses.mlm_loss(s, labels)
    (g,) = torch.autograd.grad(loss, s)
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(g, g_ref, atol=1e-7) and torch.isfinite(g).all()
    s2 = s.detach().clone()
    s2[0, 1, 5] = NEG_INF  # the label itself has probability 0: the true cross-entropy is +inf
    assert losses.mlm_loss(s2, labels).item() == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_loss_is_scale_free_even_where_the_squared_norm_overflows(dtype):
    a, b = _logits(b=2, t=3, v=16), _logits(b=2, t=3, v=16)
    mask = torch.ones(2, 3, dtype=torch.bool)
    expected = losses.cosine_loss(a, b, mask).item()
    assert 0.5 < expected < 1.5  # random directions
    for scale in (1e20, 1e30, 1e-25):  # ‖h‖² overflows (or underflows) float32
        big_a, big_b = (a * scale).to(dtype), (b * scale).to(dtype)
        ref = losses.cosine_loss(big_a.double(), big_b.double(), mask).item()  # float64 has the range
        assert losses.cosine_loss(big_a, big_b, mask).item() == pytest.approx(ref, rel=1e-5)
    assert losses.cosine_loss(a * 1e20, a * 3e20, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_mse_loss_leaves_out_entries_the_teacher_masks_and_is_inf_where_only_the_student_does():
    s, t = _logits(), _teacher_with_masked_entries()
    mask = torch.ones(2, 6, dtype=torch.bool)
    finite = torch.isfinite(t)
    ref = ((s - t)[finite] ** 2).sum() / 12  # Σ over compared entries, / N positions (HF's scale)
    assert losses.mse_loss(s, t, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    s_masked = s.clone()
    s_masked[~finite] = NEG_INF  # the student masks the same entries: still finite, the same value
    assert losses.mse_loss(s_masked, t, mask).item() == pytest.approx(ref.item(), rel=1e-5)
    s_masked[0, 1, 0] = NEG_INF  # the teacher's logit there is finite
    assert losses.mse_loss(s_masked, t, mask).item() == math.inf


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7])
def test_ce_loss_over_several_row_chunks_equals_the_one_chunk_value_and_gradient(monkeypatch, rows_per_chunk):
    """Every other test fits in one chunk; here 12 rows run in chunks of 1, 3 and 7 rows (the last one short)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 6, 40, generator=g, requires_grad=True)
    t = torch.randn(2, 6, 40, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # 10 selected rows: the chunks do not divide them evenly
    (g_ref,) = torch.autograd.grad(F.kl_div(F.log_softmax(s[mask] / 2, -1), F.log_softmax(t[mask] / 2, -1),
                                            reduction="sum", log_target=True) * 4 / 10, s)
    ref = F.kl_div(F.log_softmax(s[mask] / 2, -1), F.log_softmax(t[mask] / 2, -1), reduction="sum", log_target=True) * 4 / 10
    monkeypatch.setitem(losses.CE_CHUNK_ELEMS, "cpu", rows_per_chunk * 40)
    assert losses._chunk_rows(s.reshape(-1, 40)) == rows_per_chunk
    loss = losses.ce_loss(s, t, mask, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad, g_ref, atol=1e-6)
    assert grad[1, 4:].abs().sum() == 0  # unselected rows get no gradient
