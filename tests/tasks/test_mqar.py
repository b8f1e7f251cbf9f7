import itertools
import time

import numpy as np
import pytest
import torch

from dcablate.tasks.mqar.data import (
    SPLIT_TEST,
    SPLIT_TRAIN,
    AccuracyMeter,
    MQARData,
    Segment,
    generate_segment,
    scored_mask,
)


def _split(x, y, kv):
    keys = x[:, 0 : 2 * kv : 2].astype(np.int64)
    values = x[:, 1 : 2 * kv : 2].astype(np.int64)
    return keys, values


def _slots_of_first_key(x, y, kv):
    """0-based slot index of each row's context keys, in context order (zero filler only)."""
    keys, _ = _split(x, y, kv)
    q = x[:, 2 * kv :].astype(np.int64)
    slots = np.empty_like(keys)
    for r in range(x.shape[0]):
        for j in range(kv):
            (where,) = np.nonzero(q[r] == keys[r, j])
            assert where.size == 1
            slots[r, j] = where[0] // 2
    return slots


def test_segment_name_and_validation():
    assert Segment(64, 4, 10).name == "T64_kv4"
    with pytest.raises(ValueError):
        Segment(63, 4, 10)
    with pytest.raises(ValueError):
        Segment(64, 17, 10)
    with pytest.raises(ValueError):
        Segment(64, 0, 10)


def test_layout_ranges_and_queries_zero_filler():
    V, T, kv, N = 128, 64, 8, 300
    x, y = generate_segment(Segment(T, kv, N), V, seed=1, filler="zero")
    assert x.shape == (N, T) and y.shape == (N, T)
    assert x.dtype == np.int16 and y.dtype == np.int64
    keys, values = _split(x, y, kv)
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    for r in range(N):
        assert len(set(keys[r])) == kv
        assert len(set(values[r])) == kv
    mask = scored_mask(y)
    assert (mask.sum(axis=1) == kv).all()
    assert not mask[:, : 2 * kv].any()  # nothing in the context is scored
    q = x[:, 2 * kv :].astype(np.int64)
    for r in range(N):
        pairs = dict(zip(keys[r].tolist(), values[r].tolist()))
        (scored,) = np.nonzero(mask[r])
        seen = []
        for k in keys[r]:
            (where,) = np.nonzero(q[r] == k)
            assert where.size == 1  # each key appears exactly once in the query region
            off = int(where[0])
            assert off % 2 == 0  # at an even offset from the context end
            pos = 2 * kv + off
            assert y[r, pos] == pairs[int(k)]  # target = paired value
            if pos + 1 < T:
                assert x[r, pos + 1] == 0  # zero filler after a query key
            seen.append(pos)
        assert sorted(seen) == scored.tolist()  # exactly the query positions are scored
        # Everything in the query region that is not a query key is a zero.
        rest = np.ones(T - 2 * kv, dtype=bool)
        rest[np.asarray(seen) - 2 * kv] = False
        assert (q[r][rest] == 0).all()


def test_random_filler():
    V, T, kv, N = 8192, 256, 16, 200
    seg = Segment(T, kv, N)
    xz, yz = generate_segment(seg, V, seed=3, filler="zero")
    xr, yr = generate_segment(seg, V, seed=3, filler="random")
    assert (xz == 0).mean() > 0.5
    assert (xr == 0).mean() < 0.01
    # Scoring and key/value structure are the same kind: kv scored positions, each holding its key.
    mask = scored_mask(yr)
    assert (mask.sum(axis=1) == kv).all()
    keys, values = _split(xr, yr, kv)
    for r in range(N):
        pairs = dict(zip(keys[r].tolist(), values[r].tolist()))
        (pos,) = np.nonzero(mask[r])
        assert ((pos - 2 * kv) % 2 == 0).all() and (pos >= 2 * kv).all()
        assert sorted(xr[r, pos].tolist()) == sorted(pairs)
        for p in pos:
            assert yr[r, p] == pairs[int(xr[r, p])]
    # Non-zero tokens of the zero-filler version are untouched by the filler (same random stream
    # is used up to the filler draw).
    nz = xz != 0
    assert (xr[nz] == xz[nz]).all()
    assert (yr == yz).all()


def test_query_slots_skew_early():
    T, kv, N = 256, 4, 3000
    n_slots = (T - 2 * kv) // 2
    x, y = generate_segment(Segment(T, kv, N), 8192, seed=5, filler="zero")
    pos = np.nonzero(scored_mask(y))[1]
    slot_mean = ((pos - 2 * kv) // 2).mean()
    uniform_mean = (n_slots - 1) / 2
    assert slot_mean < 0.5 * uniform_mean
    # power_a = 1 is uniform
    x, y = generate_segment(Segment(T, kv, N), 8192, seed=5, power_a=1.0, filler="zero")
    pos = np.nonzero(scored_mask(y))[1]
    assert abs(((pos - 2 * kv) // 2).mean() - uniform_mean) < 3


def test_query_slots_sequential_weighted_sampling_exact():
    # n_slots = 6, kv = 2: (slot of key 1, slot of key 2) follows sequential sampling w/o replacement.
    T, kv, N, a = 16, 2, 40000, 0.5
    x, y = generate_segment(Segment(T, kv, N), 64, seed=11, power_a=a, filler="zero")
    slots = _slots_of_first_key(x, y, kv)
    w = np.arange(1, 7, dtype=np.float64) ** (a - 1)
    W = w.sum()
    for g1, g2 in itertools.permutations(range(6), 2):
        expected = w[g1] / W * w[g2] / (W - w[g1])
        observed = np.mean((slots[:, 0] == g1) & (slots[:, 1] == g2))
        assert abs(observed - expected) < 0.01, (g1, g2, observed, expected)


def test_determinism_and_seeds():
    seg = Segment(128, 8, 2500)  # more than one chunk
    a = generate_segment(seg, 8192, seed=7)
    b = generate_segment(seg, 8192, seed=7)
    c = generate_segment(seg, 8192, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    t1 = generate_segment(seg, 8192, seed=(7, 0, 1))
    t2 = generate_segment(seg, 8192, seed=np.random.SeedSequence([7, 0, 1]))
    assert np.array_equal(t1[0], t2[0])
    assert not np.array_equal(t1[0], a[0])


def test_large_vocab_dtype():
    x, y = generate_segment(Segment(32, 4, 10), 40000, seed=0)
    assert x.dtype == np.int32 and y.dtype == np.int64
    assert x.max() < 40000


@pytest.mark.parametrize(
    "T,kv,V,kwargs",
    [
        (63, 4, 8192, {}),
        (64, 17, 8192, {}),
        (64, 8, 16, {}),  # kv >= V/2
        (64, 4, 8192, {"filler": "nope"}),
        (64, 4, 8192, {"power_a": 0.0}),
    ],
)
def test_invalid_raises(T, kv, V, kwargs):
    with pytest.raises(ValueError):
        seg = Segment.__new__(Segment)  # bypass __post_init__ to reach generate_segment's checks
        object.__setattr__(seg, "seq_len", T)
        object.__setattr__(seg, "num_kv_pairs", kv)
        object.__setattr__(seg, "num_examples", 4)
        generate_segment(seg, V, seed=0, **kwargs)


def test_dense_kv_small_vocab():
    # kv close to V/2 exercises the dense sampling path.
    V, T, kv = 16, 32, 7
    x, y = generate_segment(Segment(T, kv, 500), V, seed=2, filler="zero")
    keys, values = _split(x, y, kv)
    assert keys.min() >= 1 and keys.max() < 8 and values.min() >= 8 and values.max() < 16
    for r in range(500):
        assert len(set(keys[r])) == kv and len(set(values[r])) == kv
    assert (scored_mask(y).sum(axis=1) == kv).all()


TRAIN = [Segment(16, 2, 50), Segment(32, 4, 37), Segment(16, 2, 5)]
TEST = [Segment(16, 2, 20), Segment(32, 4, 9)]


@pytest.fixture(scope="module")
def data():
    return MQARData(TRAIN, TEST, vocab_size=8192, data_seed=3)


def _row_index(arr):
    return {arr[i].tobytes(): i for i in range(arr.shape[0])}


def test_mqardata_seeds(data):
    other = MQARData(TRAIN, TEST, vocab_size=8192, data_seed=3)
    for (a, b), (c, d) in zip(data.train_data + data.test_data, other.train_data + other.test_data):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    # seed scheme SeedSequence([data_seed, split, j])
    x, y = generate_segment(TRAIN[1], 8192, seed=(3, SPLIT_TRAIN, 1))
    assert np.array_equal(x, data.train_data[1][0]) and np.array_equal(y, data.train_data[1][1])
    x, y = generate_segment(TEST[0], 8192, seed=(3, SPLIT_TEST, 0))
    assert np.array_equal(x, data.test_data[0][0])
    # train/test disjoint: same shape, different arrays
    assert not np.array_equal(data.train_data[0][0][:20], data.test_data[0][0])
    different = MQARData(TRAIN, TEST, vocab_size=8192, data_seed=4)
    assert not np.array_equal(different.train_data[0][0], data.train_data[0][0])


def test_train_batches(data):
    bs = 8
    steps = data.steps_per_epoch(bs)
    assert steps == 50 // 8 + 37 // 8 + 1
    lookup = [_row_index(inp) for inp, _ in data.train_data]
    it = data.train_batches(bs, seed=0)
    epochs = []
    for _ in range(2):
        seen = [[] for _ in TRAIN]
        order = []
        for _ in range(steps):
            j, x, y = next(it)
            order.append(j)
            assert x.dtype == torch.int64 and y.dtype == torch.int64
            assert x.shape == y.shape and x.shape[1] == TRAIN[j].seq_len
            assert x.shape[0] == (bs if TRAIN[j].num_examples >= bs else TRAIN[j].num_examples)
            xs = x.numpy().astype(data.train_data[j][0].dtype)
            for r in range(x.shape[0]):
                i = lookup[j][xs[r].tobytes()]  # row belongs to segment j (never mixed)
                assert np.array_equal(y[r].numpy(), data.train_data[j][1][i])
                seen[j].append(i)
        for j, seg in enumerate(TRAIN):
            assert len(seen[j]) == len(set(seen[j]))  # each example at most once per epoch
            expected = seg.num_examples if seg.num_examples < bs else (seg.num_examples // bs) * bs
            assert len(seen[j]) == expected
        epochs.append((order, seen))
    assert epochs[0][1] != epochs[1][1] or epochs[0][0] != epochs[1][0]  # reshuffled
    assert sorted(epochs[0][0]) == sorted(epochs[1][0])

    a = list(itertools.islice(data.train_batches(bs, seed=1), 25))
    b = list(itertools.islice(data.train_batches(bs, seed=1), 25))
    c = list(itertools.islice(data.train_batches(bs, seed=2), 25))
    assert all(p[0] == q[0] and torch.equal(p[1], q[1]) and torch.equal(p[2], q[2]) for p, q in zip(a, b))
    assert not all(p[0] == q[0] and torch.equal(p[1], q[1]) for p, q in zip(a, c))


def test_test_batches(data):
    got = list(data.test_batches(8))
    assert [j for j, _, _ in got] == [0, 0, 0, 1, 1]
    assert [x.shape[0] for _, x, _ in got] == [8, 8, 4, 8, 1]
    for j, (inp, tgt) in enumerate(data.test_data):
        xs = torch.cat([x for k, x, _ in got if k == j])
        ys = torch.cat([y for k, _, y in got if k == j])
        assert torch.equal(xs, torch.from_numpy(inp.astype(np.int64)))
        assert torch.equal(ys, torch.from_numpy(tgt.astype(np.int64)))


def test_accuracy_meter():
    segs = [Segment(8, 2, 2), Segment(16, 2, 1)]
    m = AccuracyMeter(segs)
    t = torch.full((2, 8), -100)
    t[0, 4], t[0, 6] = 10, 11
    t[1, 4], t[1, 6] = 12, 13
    p = torch.zeros((2, 8), dtype=torch.long)
    p[0, 4] = 10  # 1/2
    p[1, 4], p[1, 6] = 12, 13  # 2/2
    p[1, 0] = 99  # unscored positions don't matter
    m.update(0, p, t)
    r = m.result()
    assert r["T8_kv2"] == pytest.approx(0.75)
    assert r["overall"] == pytest.approx(0.75)
    t2 = torch.full((1, 16), -100)
    t2[0, 8], t2[0, 10] = 5, 6
    m.update(1, torch.zeros((1, 16), dtype=torch.long), t2)  # 0/2
    r = m.result()
    assert r["T8_kv2"] == pytest.approx(0.75)
    assert r["T16_kv2"] == pytest.approx(0.0)
    assert r["overall"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # example-weighted
    assert set(r) == {"T8_kv2", "T16_kv2", "overall"}


def test_accuracy_meter_perfect_on_generated(data):
    m = AccuracyMeter(TEST)
    for j, x, y in data.test_batches(7):
        m.update(j, y.clone(), y)
    r = m.result()
    assert r == {"T16_kv2": 1.0, "T32_kv4": 1.0, "overall": 1.0}


def test_timing():
    t0 = time.perf_counter()
    x, y = generate_segment(Segment(512, 64, 20000), 8192, seed=0)
    assert time.perf_counter() - t0 < 3.0
    assert x.shape == (20000, 512)
