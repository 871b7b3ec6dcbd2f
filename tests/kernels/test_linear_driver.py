"""The fused linear path's chunk driver (kernels/linear.py): compaction, chunk plans."""
import torch

from minorsft.kernels import linear as L


def test_compact_drops_unlabelled_rows_and_puts_pairs_side_by_side():
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8], [1, -100, -100, -100], [2, 3, 4, 9]])
    hidden = torch.arange(4 * 4 * 2, dtype=torch.float32).view(4, 4, 2)
    rows = L.compact(hidden, labels, ignore_index=-100, shift=False, pairs=True, dtype=torch.float32)
    assert rows.seq == [0, 2, 1, 3] and rows.counts == [2, 1, 2, 4]
    assert rows.seq_ids.tolist() == rows.seq and torch.equal(rows.b.unique_consecutive(), rows.seq_ids)
    assert rows.y.tolist() == [5, 6, 1, 7, 8, 2, 3, 4, 9]
    assert torch.equal(rows.h, hidden[rows.b, rows.t])
    shifted = L.compact(hidden, labels, ignore_index=-100, shift=True, pairs=False, dtype=torch.float32)
    # position t is scored against label t + 1: the last position has none
    assert shifted.counts == [2, 2, 0, 3] and (shifted.t < 3).all()
    assert shifted.y.tolist() == [5, 6, 7, 8, 3, 4, 9]


def test_sequence_chunks_hold_whole_sequences_and_pairs():
    rows = L.Rows(h=torch.zeros(10, 1), y=torch.zeros(10, dtype=torch.long), b=torch.zeros(10),
                  t=torch.zeros(10), seq=[0, 2, 1, 3], counts=[3, 2, 4, 1],
                  seq_ids=torch.tensor([0, 2, 1, 3]))
    assert L.sequence_chunks(rows, 5, pairs=False) == [(0, 5, [0, 2]), (5, 10, [1, 3])]
    assert L.sequence_chunks(rows, 5, pairs=True) == [(0, 5, [0, 2]), (5, 10, [1, 3])]
    assert L.sequence_chunks(rows, 6, pairs=False) == [(0, 5, [0, 2]), (5, 10, [1, 3])]
    assert L.sequence_chunks(rows, 10, pairs=True) == [(0, 10, [0, 2, 1, 3])]
    assert L.sequence_chunks(rows, 3, pairs=False) is None      # a sequence of 4 rows
    assert L.sequence_chunks(rows, 4, pairs=True) is None       # a pair of 5 rows
    assert L.token_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_memory_budget():
    import pytest
    assert L.memory_budget_bytes(123) == 123
    with pytest.raises(ValueError, match="memory_budget"):
        L.memory_budget_bytes(0)
