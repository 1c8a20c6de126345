"""A student's dvc dep on its stores: the digest of exactly the stores it reads (stage store_digests)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import stages.lessons as lessons
from stages.store_digests import run, stores_read
from stages.views import training_augmentation
from storage import StoreError


def _experiment(
    name: str,
    teacher: str | None = "t",
    kd: bool = True,
    adjust: str = "none",
    dtd: str = "off",
    teacher_mode: str = "offline",
) -> SimpleNamespace:
    return SimpleNamespace(
        name=name, teacher=teacher, kd=kd, adjust=adjust, dtd=dtd, teacher_mode=teacher_mode
    )


def _stores(root: Path) -> Path:
    """stores/t and stores/other, each with every store a student may read (a chunk file each)."""
    for teacher, store in itertools.product(
        ("t", "other"), ("logits", "test-logits", "adjusted-ps", "adjusted-lsr", "dtd")
    ):
        (root / teacher / f"{store}.zarr" / "c").mkdir(parents=True)
        (root / teacher / f"{store}.zarr" / "zarr.json").write_text(f'{{"{teacher}": "{store}"}}')
        (root / teacher / f"{store}.zarr" / "c" / "0").write_bytes(b"\x00\x01")
    return root


@pytest.mark.parametrize(
    "experiment, names",
    [
        (
            _experiment("ce", kd=False),
            ["test-logits.zarr"],
        ),  # the agreement metrics read the teacher's test logits
        (_experiment("ce", teacher=None, kd=False), []),
        (_experiment("kd"), ["logits.zarr", "test-logits.zarr"]),
        (
            _experiment("kd_ps_flsw", adjust="ps", dtd="flsw"),
            ["adjusted-ps.zarr", "logits.zarr", "test-logits.zarr"],
        ),
        (
            _experiment("kd_lsr_static", adjust="lsr", dtd="static"),
            ["adjusted-lsr.zarr", "dtd.zarr", "logits.zarr", "test-logits.zarr"],
        ),
    ],
)
def test_a_student_reads_its_teachers_test_logits_and_for_kd_the_stores_its_settings_name(experiment, names):
    assert (
        stores_read(
            teacher=experiment.teacher, kd=experiment.kd, adjust=experiment.adjust, dtd=experiment.dtd
        )
        == names
    )


def test_the_digest_changes_only_when_a_store_the_student_reads_changes(tmp_path):
    stores = _stores(tmp_path / "stores")
    kd_ps = _experiment("kd_ps", adjust="ps")

    def digest() -> str:
        run(kd_ps, stores_root=stores, out=tmp_path / "kd_ps.json")
        return (tmp_path / "kd_ps.json").read_text()

    before = digest()
    assert sorted(json.loads(before)["stores"]) == ["adjusted-ps.zarr", "logits.zarr", "test-logits.zarr"]
    # Another teacher's new store (lessons import-logits), or a store of its own teacher it does not read:
    (stores / "big" / "logits.zarr").mkdir(parents=True)
    (stores / "big" / "logits.zarr" / "zarr.json").write_text("{}")
    (stores / "other" / "logits.zarr" / "c" / "0").write_bytes(b"\x07")
    (stores / "t" / "adjusted-lsr.zarr" / "c" / "0").write_bytes(b"\x07")
    (stores / "t" / "dtd.zarr" / "c" / "1").write_bytes(b"\x07")
    assert digest() == before
    for changed in ("logits.zarr/c/0", "adjusted-ps.zarr/c/1", "test-logits.zarr/zarr.json"):
        (stores / "t" / changed).write_bytes(b"\x09")
        after = digest()
        assert after != before, changed
        before = after


def test_a_student_without_a_teacher_digests_no_store(tmp_path):
    summary = run(
        _experiment("ce", teacher=None, kd=False), stores_root=tmp_path / "absent", out=tmp_path / "ce.json"
    )
    assert summary == {"teacher": None, "stores": {}}
    assert json.loads((tmp_path / "ce.json").read_text()) == summary


def test_a_missing_store_is_one_error_naming_it_and_the_experiment(tmp_path):
    stores = _stores(tmp_path / "stores")
    with pytest.raises(StoreError, match=r"t/dtd.zarr: missing, and student experiment kd_static reads it"):
        (stores / "t" / "dtd.zarr" / "zarr.json").unlink()
        (stores / "t" / "dtd.zarr" / "c" / "0").unlink()
        (stores / "t" / "dtd.zarr" / "c").rmdir()
        (stores / "t" / "dtd.zarr").rmdir()
        run(_experiment("kd_static", dtd="static"), stores_root=stores, out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


class _FakeStore:
    def __init__(self, path: Path, opened: list[str]) -> None:
        opened.append(Path(path).name)
        self.path, self.attrs = Path(path), {"teacher": {"name": "t"}}
        self.content_digest = "0" * 64

    def expect(self, **_: object) -> None:
        pass

    def expect_sample_index(self, *_: object, **__: object) -> None:
        pass

    def expect_source(self, *_: object) -> None:
        pass

    def __contains__(self, name: str) -> bool:
        return False

    def array(self, name: str) -> np.ndarray:
        if name == "static_temperature":
            return np.full((1, 4), 4.0, np.float32)
        if name == "view_params":
            return np.zeros((1, 4, 0), np.int16)
        return np.zeros((1, 4), bool) if name == "fixed_target" else np.zeros((1, 4, 3), np.float32)


@pytest.mark.parametrize(
    "adjust, dtd", itertools.product(("none", "ps", "lsr"), ("off", "static", "flsw", "cwsm"))
)
def test_the_kd_stores_digested_are_the_stores_the_student_opens(monkeypatch, adjust, dtd):
    opened: list[str] = []
    monkeypatch.setattr(lessons, "open_store", lambda path, **_: _FakeStore(path, opened))
    manifest = {"splits": {"train": {"fingerprint": "f", "num_samples": 4}}, "num_classes": 3, "dataset": "d"}
    lessons.open_lessons(
        Path("stores/t"),
        adjust=adjust,
        dtd=dtd,
        manifest=manifest,
        augmentation=training_augmentation((28, 28, 1)),
        max_bytes=1 << 30,
        device=torch.device("cpu"),
    )
    # run() opens test-logits.zarr itself whenever there is a teacher.
    assert sorted([*opened, "test-logits.zarr"]) == stores_read(teacher="t", kd=True, adjust=adjust, dtd=dtd)


def test_an_online_student_digests_only_the_test_store_that_names_its_checkpoint(tmp_path):
    stores = _stores(tmp_path / "stores")
    summary = run(
        _experiment("kd_online", adjust="ps", dtd="flsw", teacher_mode="online"),
        stores_root=stores,
        out=tmp_path / "o.json",
    )
    assert sorted(summary["stores"]) == ["test-logits.zarr"]
