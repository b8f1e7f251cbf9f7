"""`batches.scored_per_row`: the host-side count of scored targets per row, in NumPy, equal to torch's; and
`batches.to_device`, the evaluations' copies to the device."""

import pytest
import torch

from dcablate.training.batches import ScoredCounts, scored_per_row, to_device


def test_counts_equal_torch_on_contiguous_and_strided_batches():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 50, (64, 96), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.7] = -100
    expected = (y != -100).sum(-1).tolist()
    assert scored_per_row(y).tolist() == expected
    window = torch.randint(0, 50, (200,), generator=g)  # LM-style rows: overlapping views of one window
    window[::3] = -100
    rows = window.unfold(0, 32, 8)
    assert not rows.is_contiguous()
    assert scored_per_row(rows).tolist() == (rows != -100).sum(-1).tolist()
    assert scored_per_row(torch.full((3, 4), -100)).tolist() == [0, 0, 0]


def test_scored_counts_hand_out_each_batchs_counts_in_order():
    counts = ScoredCounts()
    batches = [(torch.zeros(2, 3), torch.tensor([[1, -100, 2], [-100, -100, -100]])),
               (torch.zeros(1, 3), torch.tensor([[5, 6, 7]]))]
    for (x, y), (x2, y2) in zip(batches, counts.wrap(iter(batches))):
        assert x2 is x and y2 is y
    first, second = counts.pop(), counts.pop()
    assert first == (2, 0) and second == (3,)
    assert all(type(c) is int for c in first + second)  # plain ints: the step sums them on the host


def test_to_device_on_cpu_is_to():
    x, y = torch.arange(6).view(2, 3), torch.ones(4)
    for device in ("cpu", torch.device("cpu")):
        x2, y2 = to_device(device, x, y)
        assert torch.equal(x2, x) and torch.equal(y2, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_on_cuda_copies_through_pinned_memory_asynchronously_and_exactly():
    """The copies go on the current stream behind its earlier work, from pinned buffers the host may reuse:
    a long kernel queued first, then many copies of distinct batches; every batch arrives intact."""
    device = torch.device("cuda")
    stream = torch.cuda.Stream()
    batches = [torch.randint(0, 1000, (64, 257)) for _ in range(20)]
    with torch.cuda.stream(stream):
        a = torch.randn(4096, 4096, device=device)
        for _ in range(10):
            a = a @ a / 64  # keeps the stream busy while the host queues the copies
        out = [to_device(device, b[:, :-1])[0] for b in batches]  # strided views, as the LM evaluation passes
    stream.synchronize()
    assert all(o.is_cuda and torch.equal(o.cpu(), b[:, :-1]) for o, b in zip(out, batches))
