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
