"""The student gathers each sample's lessons by sample_index, whatever the batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import TemperatureConfig
from stages.functional import kd_loss
from stages.student_train import Lessons, kd_batch_loss
from storage.beton import make_loader, write_beton

N, C = 300, 5


def _lessons(seed: int = 0) -> Lessons:
    rng = np.random.default_rng(seed)
    targets = torch.from_numpy(rng.normal(size=(N, C)).astype(np.float32)) * 3
    fixed = torch.from_numpy(rng.random(N) < 0.2)
    static = torch.from_numpy(rng.uniform(1, 8, N).astype(np.float32))
    return Lessons(
        target_logits=targets, fixed_target=fixed, teacher_logits=targets.clone(), static_temperature=static
    )


def test_kd_batch_loss_uses_the_rows_named_by_sample_index_in_any_order():
    lessons = _lessons()
    rng = np.random.default_rng(1)
    index = torch.from_numpy(rng.permutation(N)[:64])
    student = torch.randn(64, C)
    labels = torch.randint(0, C, (64,))
    got = kd_batch_loss(
        student,
        labels,
        index,
        lessons=lessons,
        alpha=0.7,
        dtd="static",
        temperature_config=TemperatureConfig(),
    )
    want = kd_loss(
        student,
        lessons.target_logits[index],
        labels,
        alpha=0.7,
        temperature=lessons.static_temperature[index],
        fixed_target=lessons.fixed_target[index],
    )
    assert torch.equal(got, want)
    wrong = kd_batch_loss(
        student,
        labels,
        torch.arange(64),
        lessons=lessons,
        alpha=0.7,
        dtd="static",
        temperature_config=TemperatureConfig(),
    )
    assert not torch.allclose(got, wrong)


def test_shuffling_a_batch_permutes_nothing_but_the_order():
    lessons = _lessons()
    index = torch.arange(40, 104)
    student = torch.randn(64, C)
    labels = torch.randint(0, C, (64,))
    perm = torch.randperm(64)
    config = TemperatureConfig()
    for dtd in ("off", "static", "flsw", "cwsm"):
        a = kd_batch_loss(
            student, labels, index, lessons=lessons, alpha=0.9, dtd=dtd, temperature_config=config
        )
        b = kd_batch_loss(
            student[perm],
            labels[perm],
            index[perm],
            lessons=lessons,
            alpha=0.9,
            dtd=dtd,
            temperature_config=config,
        )
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_a_fixed_target_temperature_applies_to_lsr_rows_only_for_the_student_side_and_the_weight():
    # Independent float64 numpy: fixed rows KL(q || softmax(s / 1)) with weight 1; other rows
    # tau0^2 KL(softmax(t / tau0) || softmax(s / tau0)); batchmean; alpha = 1 leaves the KD term.
    lessons = _lessons(3)
    index = torch.arange(0, 64)
    student = torch.randn(64, C, generator=torch.Generator().manual_seed(5)) * 2
    labels = torch.randint(0, C, (64,), generator=torch.Generator().manual_seed(6))
    fixed = lessons.fixed_target[index].numpy()
    assert 0 < fixed.sum() < 64
    s, t = student.double().numpy(), lessons.target_logits[index].double().numpy()
    tau = np.where(fixed, 1.0, 4.0)[:, None]
    log_q = np.where(fixed[:, None], _log_softmax(t), _log_softmax(t / tau))
    kl = (np.exp(log_q) * (log_q - _log_softmax(s / tau))).sum(axis=1)
    want = float((tau[:, 0] ** 2 * kl).sum() / 64)
    got = kd_batch_loss(
        student,
        labels,
        index,
        lessons=lessons,
        alpha=1.0,
        dtd="off",
        temperature_config=TemperatureConfig(),
        fixed_target_temperature=1.0,
    )
    assert float(got) == pytest.approx(want, rel=1e-5)
    default = kd_batch_loss(
        student, labels, index, lessons=lessons, alpha=1.0, dtd="off", temperature_config=TemperatureConfig()
    )
    assert float(default) != pytest.approx(want, rel=1e-3)  # DESIGN §4 default: τ0 on every row
    # With per-sample temperatures (static DTD) the non-fixed rows keep their own τ.
    static = kd_batch_loss(
        student,
        labels,
        index,
        lessons=lessons,
        alpha=1.0,
        dtd="static",
        temperature_config=TemperatureConfig(),
        fixed_target_temperature=1.0,
    )
    expected = kd_loss(
        student,
        lessons.target_logits[index],
        labels,
        alpha=1.0,
        temperature=torch.where(lessons.fixed_target[index], 1.0, lessons.static_temperature[index]),
        fixed_target=lessons.fixed_target[index],
    )
    torch.testing.assert_close(static, expected)


def test_the_shuffled_ffcv_loader_returns_each_image_with_its_own_sample_index_and_label(tmp_path):
    images = np.zeros((N, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(N) % 256  # the index is written into the pixels
    images[:, 0, 1, 0] = np.arange(N) // 256
    labels = (np.arange(N) * 7) % C
    write_beton(tmp_path / "train.beton", images, labels, num_workers=1)
    loader = make_loader(tmp_path / "train.beton", batch_size=32, shuffle=True, num_workers=1, seed=3)
    seen = []
    for batch_images, batch_labels, sample_index in loader:
        decoded = batch_images[:, 0, 0, 0].long() + 256 * batch_images[:, 0, 0, 1].long()
        assert torch.equal(decoded, sample_index)
        assert torch.equal(batch_labels, torch.from_numpy(labels)[sample_index])
        seen.append(sample_index.clone())
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(N))
    assert not torch.equal(order, torch.arange(N))  # it really was shuffled


def test_more_loader_workers_than_cores_are_capped_with_a_warning(tmp_path, caplog):
    import os

    images = np.zeros((40, 28, 28, 1), np.uint8)
    write_beton(tmp_path / "t.beton", images, np.arange(40) % C, num_workers=1)
    with caplog.at_level("WARNING", logger="storage.beton"):
        loader = make_loader(tmp_path / "t.beton", batch_size=8, shuffle=False, num_workers=10_000)
        rows = sum(len(index) for _, _, index in loader)
    cores = len(os.sched_getaffinity(0))
    assert rows == 40 and f"num_workers 10000 is more than the {cores} cores available" in caplog.text


def test_the_shuffled_loader_orders_each_epoch_by_its_key_and_seeds_never_share_an_order(tmp_path):
    """Seed 1 at epoch e must not shuffle like seed 0 at epoch e + 1 (ffcv's own order draws from
    seed + epoch); every (seed, epoch) order is the keyed permutation `epoch_order`."""
    from storage.beton import epoch_order

    n, batch = 64, 16
    images = np.zeros((n, 28, 28, 1), np.uint8)
    write_beton(tmp_path / "t.beton", images, np.arange(n) % C, num_workers=1)
    orders = {}
    for seed in (0, 1):
        loader = make_loader(
            tmp_path / "t.beton", batch_size=batch, shuffle=True, num_workers=1, seed=seed, drop_last=True
        )
        for epoch in range(3):
            order = torch.cat([index.clone() for _, _, index in loader]).numpy()
            assert np.array_equal(order, epoch_order(seed, epoch, np.arange(n)))
            orders[seed, epoch] = tuple(order)
    assert len(set(orders.values())) == 6  # seed 1 epoch e differs from seed 0 epoch e + 1
    # The key is explicit: a fresh loader started at epoch 2 (a resume) sees epoch 2's order.
    resumed = make_loader(
        tmp_path / "t.beton", batch_size=batch, shuffle=True, num_workers=1, seed=1, drop_last=True
    )
    resumed.next_epoch = 2
    assert tuple(torch.cat([index.clone() for _, _, index in resumed]).numpy()) == orders[1, 2]


def test_the_experiments_loss_picks_the_family_member_on_the_gathered_rows_and_temperatures():
    # dkd (no fixed rows: KA-LSR is refused with it), ls and ttm on the rows sample_index names,
    # static DTD's per-sample τ, and τ = 1 on fixed rows for ls/ttm as for kd.
    from stages.functional import dkd_loss, ls_loss, ttm_loss

    lessons = _lessons(4)
    index = torch.from_numpy(np.random.default_rng(7).permutation(N)[:64])
    student = torch.randn(64, C, generator=torch.Generator().manual_seed(8)) * 2
    labels = torch.randint(0, C, (64,), generator=torch.Generator().manual_seed(9))
    targets, fixed, static = (
        lessons.target_logits[index],
        lessons.fixed_target[index],
        lessons.static_temperature[index],
    )
    settings = dict(lessons=lessons, alpha=0.8, dtd="static", temperature_config=TemperatureConfig())
    no_fixed = Lessons(
        target_logits=lessons.target_logits,
        fixed_target=torch.zeros(N, dtype=torch.bool),
        teacher_logits=lessons.teacher_logits,
        static_temperature=lessons.static_temperature,
    )
    dkd = kd_batch_loss(
        student, labels, index, **{**settings, "lessons": no_fixed}, loss="dkd", dkd_alpha=0.5, dkd_beta=2.0
    )
    want = dkd_loss(student, targets, labels, alpha=0.8, temperature=static, dkd_alpha=0.5, dkd_beta=2.0)
    assert torch.equal(dkd, want)
    per_row = torch.where(fixed, 1.0, static)
    for name, family in (("ls", ls_loss), ("ttm", ttm_loss)):
        got = kd_batch_loss(student, labels, index, **settings, fixed_target_temperature=1.0, loss=name)
        want = family(student, targets, labels, alpha=0.8, temperature=per_row, fixed_target=fixed)
        assert torch.equal(got, want), name
    values = [float(kd_batch_loss(student, labels, index, **settings, loss=n)) for n in ("kd", "ls", "ttm")]
    assert len({*values, float(dkd)}) == 4  # four different losses, not one under four names


def test_sharded_loaders_split_every_global_batch_of_the_keyed_order_between_the_ranks(tmp_path):
    """DDP (DESIGN §6): at each step the ranks' batches together are the one-process batch of
    that step, no row goes to two ranks, each epoch by its key, and a resume starts mid-run."""
    from storage.beton import epoch_order

    n, batch, world = 70, 8, 2  # 4 steps of 16 rows; the last 6 rows of each epoch are dropped
    images = np.zeros((n, 28, 28, 1), np.uint8)
    write_beton(tmp_path / "t.beton", images, np.arange(n) % C, num_workers=1)

    def loader(rank: int, epoch: int = 0):
        made = make_loader(
            tmp_path / "t.beton",
            batch_size=batch // world,
            shuffle=True,
            num_workers=1,
            seed=5,
            drop_last=True,
            shard=(rank, world),
        )
        made.next_epoch = epoch
        return made

    for epoch in (0, 2):
        shares = [[index.clone() for _, _, index in loader(rank, epoch)] for rank in range(world)]
        assert len(loader(0, epoch)) == len(shares[0]) == len(shares[1]) == n // batch
        one_process = epoch_order(5, epoch, np.arange(n))[: n // batch * batch].reshape(-1, batch)
        for step, expected in enumerate(one_process):
            together = torch.cat([shares[0][step], shares[1][step]]).numpy()
            assert np.array_equal(together, expected)
        assert len(np.intersect1d(torch.cat(shares[0]).numpy(), torch.cat(shares[1]).numpy())) == 0
