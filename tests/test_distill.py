"""distill(): time/step-bounded recovery that never returns a worse held-out model."""
import pytest
import torch
import torch.nn as nn

from decomp_toolkit.layers import compress
from decomp_toolkit.layers.distill import distill, relative_mse, score_map_mse


def _pair():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    student, _ = compress(teacher, method="svd", rank=3, progress=False)
    return teacher, student


def test_distill_improves_held_out_and_freezes_dense_parts():
    teacher, student = _pair()
    data, held = torch.randn(256, 16), torch.randn(64, 16)
    biases = [p.detach().clone() for n, p in student.named_parameters() if n.endswith("bias")]
    log = distill(student, teacher, data, held, max_steps=150, lr=3e-3, batch_size=32, eval_every=10)
    assert log.steps == 150 and log.best <= log.before and log.best < 0.9 * log.before
    assert log.history[0][0] == 0 and log.history[-1][0] == 150
    with torch.no_grad():  # the held-out score: mean over its batches of 32 of the relative squared error
        final = sum(float((student(h) - teacher(h)).pow(2).sum() / teacher(h).pow(2).sum())
                    for h in held.split(32)) / 2
    assert final == pytest.approx(log.best, rel=1e-4)  # the best checkpoint is the one returned
    assert all(p.requires_grad for p in student.parameters())


def test_distill_never_worse_with_a_harmful_step():
    teacher, student = _pair()
    held = torch.randn(64, 16)
    log = distill(student, teacher, torch.randn(64, 16), held, max_steps=5, lr=10.0, batch_size=32, eval_every=1)
    with torch.no_grad():
        final = float((student(held) - teacher(held)).pow(2).sum() / teacher(held).pow(2).sum())
    assert final <= log.before + 1e-6


def test_distill_rejects_bad_requests():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="params="):
        distill(student, teacher, torch.randn(8, 16), torch.randn(8, 16), params="some")
    with pytest.raises(ValueError, match="at least one batch"):
        distill(student, teacher, [], torch.randn(8, 16), max_steps=1)


def test_distill_runs_the_teacher_once_per_training_batch_when_cached():
    teacher, student = _pair()
    calls = []
    handle = teacher.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    data, held = torch.randn(64, 16), torch.randn(32, 16)
    try:
        distill(student, teacher, data, held, max_steps=12, lr=1e-3, batch_size=16, eval_every=100)
        cached = len(calls)
        calls.clear()
        _, fresh = _pair()
        distill(fresh, teacher, data, held, max_steps=12, lr=1e-3, batch_size=16, eval_every=100,
                cache_teacher=False)
    finally:
        handle.remove()
    assert cached == 2 + 4          # held-out targets (2 batches) + each of the 4 training batches once
    assert len(calls) == 2 + 12     # held-out targets + one teacher forward per step
    with torch.no_grad():           # same targets either way: the two students followed the same steps
        assert torch.allclose(student(held), fresh(held), atol=1e-6)


def test_score_map_mse_weights_positions_by_the_teacher_score():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.rand(2, 8, 8, 2, generator=gen)
    student = teacher + 0.1 * torch.randn(2, 8, 8, 2, generator=gen)
    assert torch.allclose(score_map_mse(student, teacher, foreground=0), relative_mse(student, teacher))
    weight = 1 + 5 * teacher.clamp(0, 1)
    expected = (weight * (student - teacher) ** 2).sum() / (weight * teacher ** 2).sum()
    assert torch.allclose(score_map_mse(student, teacher, foreground=5), expected)
    # the same squared error costs 1 + foreground times more at a position the teacher scores 1
    target = torch.tensor([[1.0, 0.0, 0.5, 0.5]])
    on_text, on_background = target + torch.tensor([[0.1, 0, 0, 0]]), target + torch.tensor([[0, 0.1, 0, 0]])
    ratio = score_map_mse(on_text, target, foreground=20) / score_map_mse(on_background, target, foreground=20)
    assert torch.isclose(ratio, torch.tensor(21.0))
    for bad in (-1, float("nan"), True, "20"):
        with pytest.raises(ValueError, match="foreground="):
            score_map_mse(student, teacher, foreground=bad)
