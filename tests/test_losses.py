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
        assert losses.kd_loss(s, t, mask, temperature=T).item() == pytest.approx(ref.item() * T * T, rel=1e-5)


def test_kd_gradient_matches_autograd_of_the_textbook_formula():
    s = _logits().requires_grad_(True)
    t = _logits()
    mask = torch.rand(2, 6) > 0.3
    T = 2.0
    ref = (F.softmax(t[mask] / T, -1) * (F.log_softmax(t[mask] / T, -1) - F.log_softmax(s[mask] / T, -1))).sum(-1).mean() * T * T
    (g_ref,) = torch.autograd.grad(ref, s)
    (g,) = torch.autograd.grad(losses.kd_loss(s, t, mask, temperature=T), s)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_kd_is_zero_for_identical_logits_and_ignores_padding():
    s = _logits()
    mask = torch.ones(2, 6, dtype=torch.bool)
    assert losses.kd_loss(s, s.clone(), mask, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)
    t = s.clone()
    mask[0, 5] = False
    t[0, 5] += 100.0  # a wild difference at a padded position changes nothing
    assert losses.kd_loss(s, t, mask, temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_by_hand_on_two_classes():
    s = torch.tensor([[[0.0, 0.0]]])
    t = torch.tensor([[[math.log(3.0), 0.0]]])  # p_t = (3/4, 1/4) at T=1
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert losses.kd_loss(s, t, torch.ones(1, 1, dtype=torch.bool), temperature=1.0).item() == pytest.approx(expected, rel=1e-6)


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
    assert losses.kd_loss(s, s, none, temperature=2.0).item() == 0.0
    assert losses.mlm_loss(s, torch.full((2, 6), IGNORE_INDEX)).item() == 0.0


def _global_normalised(chunks, W, A):
    """What one rank's DeepSpeed applies: the mean over ranks and micro-batches of each micro-batch loss."""
    n_global = sum(int(m.sum()) for _, _, m in chunks)
    total = 0.0
    for s, t, m in chunks:
        total += losses.kd_loss(s, t, m, temperature=2.0, normalizer=n_global / (W * A)).item()
    return total / (W * A)


@pytest.mark.parametrize("W,A", [(1, 2), (2, 1), (2, 2)])
def test_global_token_normalisation_equals_one_big_batch(W, A):
    """1 micro-batch vs A, 1 rank vs W: every token weighs the same whatever its micro-batch or rank."""
    s, t = _logits(b=4, t=6), _logits(b=4, t=6)
    mask = torch.rand(4, 6) > 0.4  # uneven token counts per chunk
    whole = losses.kd_loss(s, t, mask, temperature=2.0).item()
    rows = torch.arange(4).chunk(W * A)
    chunks = [(s[r], t[r], mask[r]) for r in rows]
    assert _global_normalised(chunks, W, A) == pytest.approx(whole, rel=1e-5)


def test_combine_weights_terms_and_reports_each():
    terms = {"ce": torch.tensor(1.0), "mlm": torch.tensor(2.0), "cos": torch.tensor(3.0)}
    total, metrics = losses.combine(terms, {"ce": 5.0, "mlm": 2.0, "cos": 0.0})
    assert total.item() == pytest.approx(9.0)
    assert set(metrics) == {"loss/ce", "loss/mlm", "loss/cos", "loss/total"}
    assert metrics["loss/cos"].item() == 3.0


def test_mse_loss_is_per_position_mean_squared_error_over_the_vocabulary():
    s, t = _logits(), _logits()
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 0] = False
    ref = ((s[mask] - t[mask]) ** 2).mean()
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
