import math

import torch

from elora_fed.model.batches import Batch
from elora_fed.model.log_odds import all_log_odds, label_log_odds, lm_log_odds, log_odds


def test_log_odds_is_log_p_over_one_minus_p():
    logits = torch.randn(7, 11, dtype=torch.float64) * 3
    target = torch.randint(0, 11, (7,))
    p = logits.softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    torch.testing.assert_close(log_odds(logits, target).double(), (p / (1 - p)).log(), rtol=1e-5, atol=1e-5)
    # the binary log loss of h is the cross-entropy of the target
    h = log_odds(logits, target).double()
    torch.testing.assert_close(torch.nn.functional.softplus(-h), -p.log(), rtol=1e-5, atol=1e-5)


def test_log_odds_stays_finite_where_p_rounds_to_one():
    logits = torch.zeros(1, 50)
    logits[0, 3] = 120.0  # p_y = 1 in float32: log(1 - p_y) would be -inf
    h = log_odds(logits, torch.tensor([3]))
    assert torch.isfinite(h).all()
    assert math.isclose(h.item(), 120.0 - math.log(49), rel_tol=1e-6)


def test_all_log_odds_matches_log_odds_for_every_candidate_even_a_certain_one():
    logits = torch.randn(3, 6, 40) * 4
    logits[0, 2, 7] = 120.0  # p = 1 in float32: the argmax is the one recomputed exactly
    every = all_log_odds(logits)
    for k in range(40):
        expected = log_odds(logits, torch.full((3, 6), k))
        torch.testing.assert_close(every[..., k], expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(every).all()
    # h increases with p: its argmax is the logits' argmax
    assert torch.equal(every.argmax(-1), logits.argmax(-1))


def test_lm_log_odds_averages_only_real_target_positions():
    logits = torch.randn(2, 5, 9)
    ids = torch.randint(0, 9, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    h = lm_log_odds(logits, ids, mask)
    expected = log_odds(logits[1, :2], ids[1, 1:3]).mean()
    torch.testing.assert_close(h[1], expected)
    torch.testing.assert_close(h[0], log_odds(logits[0, :4], ids[0, 1:]).mean())


def test_label_log_odds_reads_the_last_real_position_over_label_words():
    logits = torch.randn(2, 4, 30)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    words = torch.tensor([5, 17, 22])
    h = label_log_odds(logits, mask, words, torch.tensor([2, 0]))
    torch.testing.assert_close(h[1], log_odds(logits[1, 1, words], torch.tensor(0)))
    batch = Batch(torch.zeros(2, 4, dtype=torch.long), mask, torch.tensor([2, 0]), words)
    torch.testing.assert_close(batch.outputs(logits), h)
