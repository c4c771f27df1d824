"""mlm_step projects only the masked positions onto the vocabulary: the loss must equal the full-logits one."""

import pytest
import torch
import torch.nn.functional as F

from pipeline import models
from pipeline.config import StudentSection, TeacherSection
from pipeline.step import Batch, mlm_step


def _batch(vocab: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    am = torch.ones_like(ids)
    am[2, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 5], labels[1, 7], labels[2, 2] = 11, 12, 13, 14
    return Batch(input_ids_BT=ids, attention_mask_BT=am, labels_BT=labels)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_mlm_step_equals_cross_entropy_on_full_logits(kind):
    vocab = 50
    teacher = models.build_teacher_for_pretraining(
        TeacherSection(num_layers=2, hidden_size=16, num_heads=2, intermediate_size=32, max_position_embeddings=32),
        vocab_size=vocab, pad_token_id=0, seed=0,
    ).eval()
    model = teacher if kind == "bert" else models.build_student(StudentSection(), teacher, seed=0).eval()
    batch = _batch(vocab)
    loss, metrics = mlm_step(model, batch)
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    expected = F.cross_entropy(logits.view(-1, vocab), batch.labels_BT.view(-1), ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(metrics["loss/mlm"], expected, atol=1e-5)


class _TinyLM(torch.nn.Module):
    """Embedding → vocabulary logits: enough of a masked LM for eval_sums, and it runs on the meta device."""

    def __init__(self, vocab: int, device):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 8, device=device)
        self.out = torch.nn.Linear(8, vocab, device=device)

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.out(self.emb(input_ids)))


@pytest.mark.parametrize("with_teacher", [False, True])
def test_eval_sums_keeps_every_term_on_the_models_device(with_teacher):
    """A CPU constant stacked with device tensors crashes on a GPU; on the meta device the same bug shows on CPU."""
    from pipeline.step import eval_sums

    meta = torch.device("meta")
    b = _batch(50)
    batch = Batch(input_ids_BT=b.input_ids_BT.to(meta), attention_mask_BT=b.attention_mask_BT.to(meta),
                  labels_BT=b.labels_BT.to(meta))
    sums = eval_sums(_TinyLM(50, meta), _TinyLM(50, meta) if with_teacher else None, batch)
    assert sums.device == meta and sums.shape == (4,)


def test_eval_sums_counts_only_the_labelled_positions():
    from pipeline.step import eval_sums

    torch.manual_seed(0)
    model, teacher, batch = _TinyLM(50, "cpu"), _TinyLM(50, "cpu"), _batch(50)
    ce, correct, count, agree = eval_sums(model, teacher, batch).tolist()
    sel = batch.labels_BT != -100
    logits = model(batch.input_ids_BT, batch.attention_mask_BT).logits[sel]
    assert count == 4
    assert ce == pytest.approx(F.cross_entropy(logits, batch.labels_BT[sel], reduction="sum").item(), rel=1e-6)
    assert correct == (logits.argmax(-1) == batch.labels_BT[sel]).sum().item()
    t_pred = teacher(batch.input_ids_BT, batch.attention_mask_BT).logits[sel].argmax(-1)
    assert agree == (t_pred == logits.argmax(-1)).sum().item()
