"""Model FLOPs per token, for the tokens/s → MFU estimate. Pure arithmetic, no framework imports at module level.

For a transformer encoder with L layers, width d, FFN width f, sequence length T and vocabulary V, one
token's forward pass costs (a multiply-add counts 2 FLOPs, as in Kaplan et al. 2020 and PaLM's MFU):

    forward = L · (2·4d² + 2·2·d·f + 2·2·T·d)  +  2·d² + 2·d·V
              └ QKVO proj ┘ └ FFN ┘  └ QKᵀ, AV ┘   └ MLM head transform + vocabulary projection ┘

Training costs 3× forward (forward + backward of activations and weights). A distillation step trains the
student and runs the frozen teacher forward only:

    distill = 3 · forward(student) + forward(teacher)

The MLM pre-training step projects only the masked positions onto the vocabulary, so its head term is
scaled by the mask rate. MFU = achieved model FLOPs/s ÷ the hardware's peak FLOPs/s.
"""

from __future__ import annotations

import time


def forward_flops_per_token(*, layers: int, d: int, f: int, seq_len: int, vocab: int, head_fraction: float = 1.0) -> float:
    """Forward FLOPs per token of an encoder with ``layers`` layers, width ``d``, FFN width ``f``, ``seq_len``
    tokens per row and a ``vocab``-row MLM head (the module docstring's formula; Kaplan et al. 2020 counting).
    ``head_fraction`` is the share of positions the head projects (the mask rate for MLM pre-training)."""
    per_layer = 2 * 4 * d * d + 2 * 2 * d * f + 2 * 2 * seq_len * d
    head = (2 * d * d + 2 * d * vocab) * head_fraction
    return layers * per_layer + head


def shape_of(config) -> dict:
    """(layers, d, f, vocab) from an HF config of any family (:meth:`pipeline.families.base.Family.shape`)."""
    from pipeline import families  # deferred: flops is pure arithmetic at import; families load transformers

    return families.of(config).shape(config)


def step_flops_per_token(student_config, teacher_config, *, seq_len: int, mask_prob: float) -> float:
    """Training FLOPs per token: distillation when a teacher is given, MLM pre-training when it is None."""
    if teacher_config is None:
        return 3 * forward_flops_per_token(**shape_of(student_config), seq_len=seq_len, head_fraction=mask_prob)
    student = forward_flops_per_token(**shape_of(student_config), seq_len=seq_len)
    teacher = forward_flops_per_token(**shape_of(teacher_config), seq_len=seq_len)
    return 3 * student + teacher


def measure_peak_tflops(device, dtype=None, n: int = 8192, reps: int = 20) -> float:
    """The achieved dense matmul TFLOP/s of this GPU (the MFU denominator): n×n×n products, timed (bf16 unless
    ``dtype`` says otherwise). The one function here that needs torch, imported when it runs."""
    import torch

    dtype = dtype or torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
