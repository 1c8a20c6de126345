"""Multi-view stores on the tiny pipeline (28×28: the flip views, V = 2): what the dump stores,
KA and DTD per view, offline lessons equal to online KD step by step, scheduled stores, replay,
streaming, resume, and the bad inputs of DESIGN §5."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import stages.student_train as student_train
import stages.training as training
from stages.lessons import open_lessons
from stages.views import training_augmentation
from storage import open_store
from storage.manifest import read_prepared
from tests.reliability.conftest import (
    BATCH,
    NUM_TRAIN,
    as_written,
    cli,
    ok,
    one_line_error,
    spawn_cli,
    tree_digest,
    wait_for,
    write_params,
)


@dataclass(frozen=True)
class Views:
    root: Path
    params: Path
    stores: Path  # stores/ holding t/ dumped with views: all

    @property
    def teacher(self) -> Path:
        return self.stores / "t"


def _dump(params: Path, pipeline, stores: Path) -> None:
    teacher = stores / "t"
    ok(
        cli(
            params,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--out",
            teacher / "logits.zarr",
            "--test-out",
            teacher / "test-logits.zarr",
        )
    )
    for method in ("ps", "lsr"):
        ok(
            cli(
                params,
                "adjust",
                "--method",
                method,
                "--logits",
                teacher / "logits.zarr",
                "--out",
                teacher / f"adjusted-{method}.zarr",
                "--metrics-out",
                stores / f"{method}.json",
            )
        )
    ok(
        cli(
            params,
            "temperature",
            "--logits",
            teacher / "logits.zarr",
            "--out",
            teacher / "dtd.zarr",
            "--metrics-out",
            stores / "dtd.json",
            "--histogram-out",
            stores / "hist.json",
        )
    )


@pytest.fixture(scope="module")
def views(tmp_path_factory, pipeline) -> Views:
    """The tiny pipeline's teacher dumped with views: all (2 views), with KA and DTD stores."""
    root = tmp_path_factory.mktemp("views")
    params = write_params(root / "params.yaml", pipeline.params, teacher_dump={"views": "all"})
    _dump(params, pipeline, root / "stores")
    return Views(root=root, params=params, stores=root / "stores")


def _student(params: Path, pipeline, stores: Path, out: Path, experiment: str, *extra: str):
    return cli(
        params,
        "student-train",
        "--experiment",
        experiment,
        "--data",
        pipeline.data,
        "--stores",
        stores,
        "--teacher-checkpoints",
        pipeline.checkpoint.parent,
        "--checkpoint-out",
        out / f"{experiment}.pt",
        "--metrics-out",
        out / f"{experiment}.json",
        "--curve-out",
        out / f"{experiment}-curve.json",
        *extra,
    )


def test_an_all_store_holds_every_flip_view_and_view_0_is_the_plain_dump(views, pipeline):
    store = open_store(views.teacher / "logits.zarr")
    plain = open_store(pipeline.teacher_stores / "logits.zarr")
    assert store.array("logits").shape == (2, NUM_TRAIN, 4)
    params = store.read("view_params")
    assert params.shape == (2, NUM_TRAIN, 3)
    assert (params[0] == [0, 0, 0]).all() and (params[1] == [0, 0, 1]).all()
    assert store.attrs["view_spec"]["views"] == "all" and store.attrs["num_views"] == 2
    # The unflipped view is the plain image: the same forward as the V = 1 dump, bit for bit.
    assert store.read("logits")[0].tobytes() == plain.read("logits")[0].tobytes()
    assert not np.array_equal(store.read("logits")[1], store.read("logits")[0])
    assert open_store(views.teacher / "test-logits.zarr").attrs["num_views"] == 1  # test split: plain image


def test_ka_and_dtd_run_per_view_as_numpy_computes_them(views):
    logits = open_store(views.teacher / "logits.zarr").read("logits").astype(np.float64)  # (V, N, C)
    labels = open_store(views.teacher / "logits.zarr").read("labels")
    adjusted = open_store(views.teacher / "adjusted-ps.zarr")
    wrong = logits[:, np.arange(NUM_TRAIN), labels] < logits.max(axis=2)  # (V, N)
    assert adjusted.read("rewritten").shape == (2, NUM_TRAIN)
    assert np.array_equal(adjusted.read("rewritten"), wrong)
    want = logits.copy()
    for v, n in zip(*np.nonzero(wrong), strict=True):
        top = int(logits[v, n].argmax())
        want[v, n, [top, labels[n]]] = logits[v, n, [labels[n], top]]
    assert np.array_equal(adjusted.read("target_logits").astype(np.float64), want)
    dtd = open_store(views.teacher / "dtd.zarr")
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    probs /= probs.sum(axis=2, keepdims=True)
    omega = 1.0 / (probs.max(axis=2) + 1e-3)
    np.testing.assert_allclose(dtd.read("omega_teacher"), omega, rtol=1e-5)
    metrics = json.loads((views.stores / "ps.json").read_text())
    assert metrics["rewritten_views"] == int(wrong.sum())
    plain_right_some_view_wrong = (~wrong[0] & wrong.any(axis=0)).mean()
    assert metrics["right_plain_wrong_some_view"] == pytest.approx(plain_right_some_view_wrong)
    top = logits.argmax(axis=2)  # (V, N); view 0 is the plain image
    assert metrics["top_class_changed_fraction"] == pytest.approx((top != top[0]).mean())


def _record_steps(monkeypatch) -> dict[str, list]:
    """Capture every training step's normalised images and teacher targets (sample order)."""
    seen: dict[str, list] = {"images": [], "targets": [], "teacher": [], "index": []}
    normalize, kd_batch_loss = training.normalize, student_train.kd_batch_loss

    def recording_normalize(images, mean, std):
        out = normalize(images, mean, std)
        if images.shape[0] == BATCH:  # a training batch (evaluation batches are larger)
            seen["images"].append(out.clone())
        return out

    def recording_loss(logits, labels, index, *, lessons, **kwargs):
        seen["targets"].append(lessons.target_logits[index].clone())
        seen["teacher"].append(lessons.teacher_logits[index].clone())
        seen["index"].append(index.clone())
        return kd_batch_loss(logits, labels, index, lessons=lessons, **kwargs)

    monkeypatch.setattr(training, "normalize", recording_normalize)
    monkeypatch.setattr(student_train, "kd_batch_loss", recording_loss)
    return seen


def test_offline_lessons_from_an_all_store_equal_online_kd_step_by_step(
    views, pipeline, tmp_path, monkeypatch
):
    experiments = {
        "off": {"teacher": "t", "adjust": "ps", "dtd": "flsw"},
        "on": {"teacher": "t", "adjust": "ps", "dtd": "flsw", "teacher_mode": "online"},
    }
    params = write_params(
        tmp_path / "params.yaml",
        json.loads(json.dumps(_params(views))),
        student_train={"experiments": experiments, "epochs": 1},
    )
    runs = {}
    for name in experiments:
        with monkeypatch.context() as patch:
            runs[name] = _record_steps(patch)
            ok(_student(params, pipeline, views.stores, tmp_path, name))
    off, on = runs["off"], runs["on"]
    assert len(off["images"]) == len(on["images"]) == NUM_TRAIN // BATCH
    for a, b in zip(off["images"], on["images"], strict=True):
        assert torch.equal(a, b)  # the very same views, pixel for pixel
    for key in ("targets", "teacher"):
        for a, b in zip(off[key], on[key], strict=True):  # stored float16 vs the live float32 forward
            torch.testing.assert_close(a, b, rtol=2**-10, atol=1e-4)
    metrics = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in experiments}
    assert abs(metrics["off"]["test_top1"] - metrics["on"]["test_top1"]) <= 1 / 64  # one test image at most


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _params(views: Views) -> dict:
    return yaml_load(views.params)


def test_a_none_store_is_the_fixed_teacher_the_student_does_not_see(views, pipeline, tmp_path, monkeypatch):
    # With the plain image's targets, a flipped training view still gets view 0's logits.
    seen = _record_steps(monkeypatch)
    params = write_params(
        tmp_path / "params.yaml",
        pipeline.params,
        student_train={"experiments": {"kd": {"teacher": "t", "adjust": "none", "dtd": "flsw"}}},
    )
    ok(_student(params, pipeline, pipeline.stores, tmp_path, "kd"))
    plain = torch.from_numpy(
        open_store(pipeline.teacher_stores / "logits.zarr").read("logits")[0].astype(np.float32)
    )
    assert len(seen["targets"]) == NUM_TRAIN // BATCH
    for targets, index in zip(seen["targets"], seen["index"], strict=True):
        assert torch.equal(targets, plain[index])


def test_a_scheduled_store_serves_its_seeds_and_refuses_others_in_one_line(pipeline, tmp_path):
    params = write_params(
        tmp_path / "params.yaml",
        pipeline.params,
        teacher_dump={"views": "scheduled", "seeds": [0, 1], "epochs": 2},
        student_train={
            "seeds": [0, 1, 5],
            "epochs": 2,
            "experiments": {"kd": {"teacher": "t", "adjust": "none", "dtd": "off"}},
        },
    )
    teacher = tmp_path / "stores" / "t"
    ok(
        cli(
            params,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--out",
            teacher / "logits.zarr",
            "--test-out",
            teacher / "test-logits.zarr",
        )
    )
    store = open_store(teacher / "logits.zarr")
    assert store.array("logits").shape == (4, NUM_TRAIN, 4)  # 2 seeds x 2 epochs
    ok(_student(params, pipeline, tmp_path / "stores", tmp_path, "kd", "--seed", "1"))
    line = one_line_error(
        _student(params, pipeline, tmp_path / "stores", tmp_path, "kd", "--seed", "5"), "teacher_dump.seeds"
    )
    assert "seed 5" in line
    longer = write_params(tmp_path / "p3.yaml", yaml_load(params), student_train={"epochs": 3})
    line = one_line_error(
        _student(longer, pipeline, tmp_path / "stores", tmp_path, "kd", "--seed", "0"), "teacher_dump.epochs"
    )
    assert "epoch 3" in line and not (tmp_path / "kd.pt.state").exists()  # refused before any training
    assert (
        not (tmp_path / "kd.json").exists()
        or json.loads((tmp_path / "kd-config.json").read_text())["seed"] == 1
    )


@pytest.mark.parametrize("adjust, dtd", [("ps", "static"), ("none", "flsw")])
def test_streamed_and_in_memory_lessons_give_identical_epochs(views, pipeline, adjust, dtd):
    manifest = read_prepared(pipeline.data)
    common = dict(
        adjust=adjust,
        dtd=dtd,
        manifest=manifest,
        augmentation=training_augmentation((28, 28, 1)),
        device=torch.device("cpu"),
    )
    memory, _, _ = open_lessons(views.teacher, max_bytes=1 << 30, **common)
    streamed, _, _ = open_lessons(views.teacher, max_bytes=0, **common)
    assert not memory.streamed and streamed.streamed
    for epoch in range(3):
        (a, pa), (b, pb) = memory.epoch(3, epoch), streamed.epoch(3, epoch)
        assert np.array_equal(pa, pb)
        for field in ("target_logits", "fixed_target", "teacher_logits", "static_temperature"):
            one, other = getattr(a, field), getattr(b, field)
            assert (one is None) == (other is None) and (one is None or torch.equal(one, other)), field
        assert (a.teacher_logits is not None) == (dtd == "flsw")
    picks = memory.views.pick(3, 0, np.arange(NUM_TRAIN))
    assert 0 < picks.mean() < 1  # both views drawn


def test_verify_views_replays_a_real_store_and_fails_an_edited_one(views, pipeline, tmp_path):
    result = ok(
        cli(
            views.params,
            "verify-views",
            views.teacher / "logits.zarr",
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--samples",
            "100",
        )
    )
    assert "replayed 100 (view, sample) pairs of 2 views" in result.output and ": ok" in result.output
    copy = tmp_path / "logits.zarr"
    shutil.copytree(views.teacher / "logits.zarr", copy, ignore=shutil.ignore_patterns("*.lock"))
    import zarr

    array = zarr.open_array(copy / "logits", mode="r+")
    block = array[...]
    block[1] += 0.5  # every flipped view off by half a logit
    array[...] = block
    as_written(copy)
    line = one_line_error(
        cli(
            views.params,
            "verify-views",
            copy,
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--samples",
            "200",
        ),
        "max |Δ logit|",
        "rebuild it",
    )
    assert "0.5" in line


def test_a_student_without_augmentation_refuses_a_multi_view_store(views, pipeline, tmp_path):
    params = write_params(tmp_path / "params.yaml", pipeline.params, student_train={"augment": False})
    line = one_line_error(_student(params, pipeline, views.stores, tmp_path, "kd"), "student_train.augment")
    assert "views: none" in line
    assert not (tmp_path / "kd.pt").exists() and not (tmp_path / "kd.json").exists()


def test_a_scheduled_store_that_misses_a_configured_seed_or_epoch_is_refused_by_check_params(
    pipeline, tmp_path
):
    params = write_params(
        tmp_path / "params.yaml",
        pipeline.params,
        teacher_dump={"views": "scheduled", "seeds": [0], "epochs": 1},
        student_train={"seeds": [0, 1]},
    )
    line = one_line_error(cli(params, "check-params"), "teacher_dump.seeds", "views: all")
    assert "seeds [0, 1]" in line
    params = write_params(
        tmp_path / "p2.yaml", pipeline.params, teacher_dump={"views": "scheduled", "seeds": [0], "epochs": 1}
    )
    line = one_line_error(cli(params, "check-params"), "teacher_dump.epochs")  # kd_ps_2ep runs 2 epochs
    assert "kd_ps_2ep" in line
    ok(
        cli(
            write_params(
                tmp_path / "p3.yaml",
                pipeline.params,
                teacher_dump={"views": "scheduled", "seeds": [0], "epochs": 2},
            ),
            "check-params",
        )
    )


def test_view_settings_without_their_keys_are_one_line_errors(pipeline, tmp_path):
    params = write_params(tmp_path / "params.yaml", pipeline.params, teacher_dump={"views": "sample"})
    one_line_error(cli(params, "check-params"), "teacher_dump.num_views")
    params = write_params(tmp_path / "p2.yaml", pipeline.params, teacher_dump={"views": "every"})
    one_line_error(cli(params, "check-params"), "teacher_dump.views")


@pytest.mark.slow  # a real `lessons` process
def test_a_killed_multi_view_dump_resumes_byte_identical(views, pipeline, tmp_path):
    out, test_out = tmp_path / "stores" / "t" / "logits.zarr", tmp_path / "stores" / "t" / "test-logits.zarr"
    marks = out.with_name(out.name + ".partial") / ".lessons" / "done"
    args = (
        "teacher-dump",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint",
        pipeline.checkpoint,
        "--out",
        out,
        "--test-out",
        test_out,
    )
    log = tmp_path / "child.log"
    proc = spawn_cli(views.params, *args, cwd=tmp_path, pause_s=60, log=log)
    try:
        wait_for(
            lambda: marks.is_dir() and any(m.name.isdigit() for m in marks.iterdir()),
            proc,
            240,
            "the first chunk mark",
            log,
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not out.exists()
    result = ok(cli(views.params, *args))
    assert "resuming" in result.output
    assert tree_digest(out) == tree_digest(views.teacher / "logits.zarr")


def test_random_resized_crop_data_stores_sampled_views_that_replay_and_train(tmp_path):
    # A generated 64×64 RGB miniature (the real layout of Tiny ImageNet-sized data): sample K views.
    from tests.reliability.conftest import base_params, make_npz

    rng = np.random.default_rng(0)
    labels = np.arange(96) % 4
    images = rng.integers(0, 200, (96, 64, 64, 3), dtype=np.uint8)
    for c in range(4):
        images[labels == c, 16 * c : 16 * c + 16] += 50
    npz = make_npz(
        tmp_path / "big.npz", x_train=images[:64], y_train=labels[:64], x_test=images[64:], y_test=labels[64:]
    )
    params = base_params(npz)
    params["teacher_dump"].update(views="all")
    bad = write_params(tmp_path / "bad.yaml", params)
    data, checkpoint, teacher = tmp_path / "data", tmp_path / "t.pt", tmp_path / "stores" / "t"
    ok(cli(bad, "prepare-data", "--out", data))
    ok(
        cli(
            bad,
            "teacher-train",
            "--teacher",
            "t",
            "--data",
            data,
            "--checkpoint-out",
            checkpoint,
            "--metrics-out",
            tmp_path / "t.json",
            "--curve-out",
            tmp_path / "t-curve.json",
        )
    )
    dump = (
        "teacher-dump",
        "--teacher",
        "t",
        "--data",
        data,
        "--checkpoint",
        checkpoint,
        "--out",
        teacher / "logits.zarr",
        "--test-out",
        teacher / "test-logits.zarr",
    )
    one_line_error(cli(bad, *dump), "views: all", "views: sample with num_views")
    assert not teacher.exists()
    params["teacher_dump"].update(views="sample", num_views=3)
    good = write_params(tmp_path / "good.yaml", params)
    ok(cli(good, *dump))
    store = open_store(teacher / "logits.zarr")
    assert store.array("logits").shape == (3, 64, 4)
    top, left, height, width, flip = np.moveaxis(store.read("view_params").astype(int), -1, 0)
    assert (top + height <= 64).all() and (left + width <= 64).all() and set(np.unique(flip)) <= {0, 1}
    assert len({tuple(p) for p in store.read("view_params").reshape(-1, 5).tolist()}) > 150  # distinct crops
    result = ok(
        cli(
            good,
            "verify-views",
            teacher / "logits.zarr",
            "--data",
            data,
            "--checkpoint",
            checkpoint,
            "--samples",
            "64",
        )
    )
    assert ": ok" in result.output
    ok(
        cli(
            good,
            "student-train",
            "--experiment",
            "kd",
            "--data",
            data,
            "--stores",
            tmp_path / "stores",
            "--checkpoint-out",
            tmp_path / "s.pt",
            "--metrics-out",
            tmp_path / "s.json",
            "--curve-out",
            tmp_path / "s-curve.json",
        )
    )
    assert 0.0 <= json.loads((tmp_path / "s.json").read_text())["test_top1"] <= 1.0


def test_a_student_without_augmentation_and_a_multi_view_dump_are_refused_by_check_params(pipeline, tmp_path):
    params = write_params(
        tmp_path / "p.yaml", pipeline.params, teacher_dump={"views": "all"}, student_train={"augment": False}
    )
    one_line_error(cli(params, "check-params"), "student_train.augment", "teacher_dump.views: none")
    huge = write_params(
        tmp_path / "h.yaml", pipeline.params, teacher_dump={"views": "sample", "num_views": 100_000_000_000}
    )
    one_line_error(cli(huge, "check-params"), "teacher_dump.num_views", "lower it")


def _edited_copy(views: Views, tmp_path: Path) -> Path:
    stores = tmp_path / "stores"
    shutil.copytree(views.stores, stores, ignore=shutil.ignore_patterns("*.lock"))
    return stores


@pytest.mark.parametrize("edit", ["view_spec_text", "view_params_out_of_range", "array_metadata_not_json"])
def test_a_store_edited_after_it_was_written_is_one_line_for_every_reader(views, pipeline, tmp_path, edit):
    import zarr

    stores = _edited_copy(views, tmp_path)
    logits = stores / "t" / "logits.zarr"
    if edit == "view_spec_text":
        group = zarr.open_group(logits, mode="r+")
        group.attrs["view_spec"] = "all"
    elif edit == "view_params_out_of_range":
        array = zarr.open_array(logits / "view_params", mode="r+")
        block = array[...]
        block[1, 5, 0] = 50  # a crop offset beyond the 28x28 image's padding of 0
        array[...] = block
        as_written(logits)
    else:
        (logits / "logits" / "zarr.json").write_text("{nope")
    one_line_error(_student(views.params, pipeline, stores, tmp_path, "kd"), str(logits))
    one_line_error(
        cli(
            views.params,
            "verify-views",
            logits,
            "--data",
            pipeline.data,
            "--checkpoint",
            pipeline.checkpoint,
            "--samples",
            "8",
        ),
        str(logits),
    )


def test_a_manifest_that_is_not_one_is_one_line(pipeline, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(pipeline.data, data, ignore=shutil.ignore_patterns("*.lock"))
    (data / "manifest.json").write_text("[]")
    one_line_error(
        cli(
            pipeline.params_path,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            data,
            "--checkpoint",
            pipeline.checkpoint,
            "--out",
            tmp_path / "s" / "l.zarr",
            "--test-out",
            tmp_path / "s" / "t.zarr",
        ),
        "manifest.json",
        "prepare-data",
    )


def test_a_multi_view_import_without_lessons_views_is_refused_before_anything_is_written(pipeline, tmp_path):
    import h5py

    logits = open_store(pipeline.teacher_stores / "logits.zarr").read("logits")
    path = tmp_path / "views.h5"
    with h5py.File(path, "w") as f:
        f["logits"] = np.concatenate([logits, logits]).astype(np.float32)  # V = 2, but no view_params
        f["sample_index"] = np.arange(NUM_TRAIN)
    out = tmp_path / "imported.zarr"
    one_line_error(
        cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out),
        "2 views per sample",
        "view_spec",
    )
    assert not out.exists()
