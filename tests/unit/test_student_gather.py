"""The student gathers each sample's lessons by sample_index, whatever the batch order."""
from __future__ import annotations

import numpy as np
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
    return Lessons(target_logits=targets, fixed_target=fixed, teacher_logits=targets.clone(),
                   static_temperature=static)


def test_kd_batch_loss_uses_the_rows_named_by_sample_index_in_any_order():
    lessons = _lessons()
    rng = np.random.default_rng(1)
    index = torch.from_numpy(rng.permutation(N)[:64])
    student = torch.randn(64, C)
    labels = torch.randint(0, C, (64,))
    got = kd_batch_loss(student, labels, index, lessons=lessons, alpha=0.7, dtd="static",
                        temperature_config=TemperatureConfig())
    want = kd_loss(student, lessons.target_logits[index], labels, alpha=0.7,
                   temperature=lessons.static_temperature[index], fixed_target=lessons.fixed_target[index])
    assert torch.equal(got, want)
    wrong = kd_batch_loss(student, labels, torch.arange(64), lessons=lessons, alpha=0.7, dtd="static",
                          temperature_config=TemperatureConfig())
    assert not torch.allclose(got, wrong)


def test_shuffling_a_batch_permutes_nothing_but_the_order():
    lessons = _lessons()
    index = torch.arange(40, 104)
    student = torch.randn(64, C)
    labels = torch.randint(0, C, (64,))
    perm = torch.randperm(64)
    config = TemperatureConfig()
    for dtd in ("off", "static", "flsw", "cwsm"):
        a = kd_batch_loss(student, labels, index, lessons=lessons, alpha=0.9, dtd=dtd, temperature_config=config)
        b = kd_batch_loss(student[perm], labels[perm], index[perm], lessons=lessons, alpha=0.9, dtd=dtd,
                          temperature_config=config)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_shuffled_ffcv_loader_returns_each_image_with_its_own_sample_index_and_label(tmp_path):
    images = np.zeros((N, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(N) % 256  # the index is written into the pixels
    images[:, 0, 1, 0] = np.arange(N) // 256
    labels = (np.arange(N) * 7) % C
    write_beton(tmp_path / "train.beton", images, labels, num_workers=1)
    loader = make_loader(tmp_path / "train.beton", batch_size=32, shuffle=True, augment=False,
                         image_shape=(28, 28, 1), num_workers=1, seed=3)
    seen = []
    for batch_images, batch_labels, sample_index in loader:
        decoded = batch_images[:, 0, 0, 0].long() + 256 * batch_images[:, 0, 0, 1].long()
        assert torch.equal(decoded, sample_index)
        assert torch.equal(batch_labels, torch.from_numpy(labels)[sample_index])
        seen.append(sample_index.clone())
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(N))
    assert not torch.equal(order, torch.arange(N))  # it really was shuffled
