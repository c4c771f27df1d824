"""The golden-loss guard: a refactor that claims "no math change" must leave these numbers identical.

A fixed tiny teacher, its student, one fixed masked batch; three AdamW steps of the distillation step (all four
terms on, L_mse at HF's scale) and of the teacher's MLM step. Every loss term at every step is compared with
``tests/golden/losses.json`` to a relative 1e-6 (float32 on CPU; the slack covers BLAS differences between
machines, not a changed formula). A deliberate change of the math regenerates the file:

    DISTIL_UPDATE_GOLDEN=1 python -m pytest tests/test_step_golden.py

and says why in its commit message.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from pipeline import masking, models, step as step_lib
from pipeline.config import LossSection, StudentSection, TeacherSection

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
VOCAB, PAD, CLS, SEP, MASK = 64, 0, 1, 2, 3


def _batch() -> step_lib.Batch:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(5, VOCAB, (4, 24), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    am = torch.ones_like(ids)
    ids[3, 16:], am[3, 16:] = PAD, 0  # one padded row: pads are never supervised
    ids[3, 15] = SEP
    masked, labels = masking.mask_tokens(ids, am, special_ids=torch.tensor([PAD, CLS, SEP, MASK]), mask_id=MASK,
                                         vocab_size=VOCAB, generator=masking.step_generator(7, 0, 0), mask_prob=0.3)
    return step_lib.Batch(input_ids_BT=masked, attention_mask_BT=am, labels_BT=labels)


def _teacher():
    cfg = TeacherSection(num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=32)
    teacher = models.build_teacher_for_pretraining(cfg, vocab_size=VOCAB, pad_token_id=PAD, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # weights far from init, so the teacher's distribution is sharp and every term is large
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return teacher


def _three_steps(model, loss_fn) -> list[dict[str, float]]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for _ in range(3):
        loss, metrics = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append({k: float(v) for k, v in sorted(metrics.items())})
    return out


def _measure() -> dict:
    torch.use_deterministic_algorithms(True)
    try:
        batch = _batch()
        counts = step_lib.count_supervised(batch, "all")  # one rank, one micro-batch: N_ce, N_mlm
        teacher = _teacher().eval()  # eval: dropout off, so the numbers depend on the math alone
        student = models.build_student(StudentSection(layer_map="alternate"), teacher, seed=0).eval()
        loss_cfg = LossSection(temperature=2.0, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, alpha_mse=0.5)
        distill = _three_steps(student, lambda: step_lib.distill_step(
            student, teacher, batch, loss_cfg=loss_cfg, norm_ce=counts[0], norm_mlm=counts[1]))
        fresh = _teacher().eval()
        mlm = _three_steps(fresh, lambda: step_lib.mlm_step(fresh, batch, norm_mlm=counts[1]))
        return {"distill": distill, "teacher_mlm": mlm, "counts": counts.tolist()}
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_loss_terms_of_three_steps_match_the_golden_file():
    got = _measure()
    if os.environ.get("DISTIL_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got["counts"] == want["counts"]
    for kind in ("distill", "teacher_mlm"):
        assert len(got[kind]) == len(want[kind]) == 3
        for i, (g, w) in enumerate(zip(got[kind], want[kind])):
            assert set(g) == set(w), f"{kind} step {i + 1}: terms {sorted(g)} vs golden {sorted(w)}"
            for term in w:
                assert g[term] == pytest.approx(w[term], rel=1e-6), f"{kind} step {i + 1}: {term}"
    assert set(want["distill"][0]) == {"loss/ce", "loss/mlm", "loss/cos", "loss/mse", "loss/total"}
    # The steps trained: the total fell (a golden file of a step that does nothing would prove nothing).
    assert want["distill"][2]["loss/total"] < want["distill"][0]["loss/total"]
    assert want["teacher_mlm"][2]["loss/mlm"] < want["teacher_mlm"][0]["loss/mlm"]
