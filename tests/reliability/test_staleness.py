"""No stale cache: every consumer refuses a store that does not belong to what it is combined
with, in one line that names what differs and both sides, before writing anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.reliability.conftest import (
    NUM_TRAIN,
    Pipeline,
    as_written,
    cli,
    leftovers,
    make_npz,
    ok,
    one_line_error,
    teacher_h5,
    write_params,
)


def _student(params: Path, experiment: str, *, data: Path, stores: Path, out: Path):
    return cli(
        params,
        "student-train",
        "--experiment",
        experiment,
        "--data",
        data,
        "--stores",
        stores,
        "--checkpoint-out",
        out / "s.pt",
        "--metrics-out",
        out / "s.json",
        "--curve-out",
        out / "s-curve.json",
    )


def _assert_no_student_outputs(out: Path) -> None:
    assert not any((out / name).exists() for name in ("s.pt", "s.json", "s-curve.json", "s.pt.state"))


@pytest.fixture(scope="module")
def retrained(pipeline: Pipeline, tmp_path_factory) -> Path:
    """stores/ of teacher `t` retrained with another seed (teacher B), dumped on the same data."""
    root = tmp_path_factory.mktemp("retrained")
    params = write_params(root / "params.yaml", pipeline.params)
    teachers = {"t": {**pipeline.params["teacher_train"]["teachers"]["t"], "seed": 1}}
    write_params(params, pipeline.params, teacher_train={"teachers": teachers})
    checkpoint = root / "tB.pt"
    ok(
        cli(
            params,
            "teacher-train",
            "--teacher",
            "t",
            "--data",
            pipeline.data,
            "--checkpoint-out",
            checkpoint,
            "--metrics-out",
            root / "m.json",
            "--curve-out",
            root / "c.json",
        )
    )
    ok(
        cli(
            params,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            pipeline.data,
            "--checkpoint",
            checkpoint,
            "--out",
            root / "stores" / "t" / "logits.zarr",
            "--test-out",
            root / "stores" / "t" / "test-logits.zarr",
        )
    )
    return root / "stores"


@pytest.fixture(scope="module")
def datasets(pipeline: Pipeline, tmp_path_factory) -> dict[str, Path]:
    """Prepared variants of the session dataset: a smaller subset, one label edited, the rows
    in another order, and another dataset altogether (same N, C and image shape)."""
    root = tmp_path_factory.mktemp("variants")
    base = np.load(pipeline.npz)
    arrays = {k: base[k] for k in base.files}
    relabeled = dict(arrays, y_train=arrays["y_train"].copy())
    relabeled["y_train"][5] = (relabeled["y_train"][5] + 1) % 4
    order = np.random.default_rng(7).permutation(NUM_TRAIN)
    npzs = {
        "subset": (pipeline.npz, {"max_train_samples": 200, "seed": 1}),
        "relabeled": (make_npz(root / "relabeled.npz", **relabeled), {}),
        "reordered": (
            make_npz(
                root / "reordered.npz",
                **dict(arrays, x_train=arrays["x_train"][order], y_train=arrays["y_train"][order]),
            ),
            {},
        ),
        "other": (make_npz(root / "other.npz", seed=99), {}),
    }
    out = {}
    for name, (npz, data) in npzs.items():
        params = write_params(root / f"{name}.yaml", pipeline.params, data={"root": str(npz), **data})
        ok(cli(params, "prepare-data", "--out", root / name))
        out[name] = root / name
    # The teacher's stores for the other dataset (a 28x28 4-class net runs on any such images).
    ok(
        cli(
            pipeline.params_path,
            "teacher-dump",
            "--teacher",
            "t",
            "--data",
            out["other"],
            "--checkpoint",
            pipeline.checkpoint,
            "--out",
            root / "other-stores" / "t" / "logits.zarr",
            "--test-out",
            root / "other-stores" / "t" / "test-logits.zarr",
        )
    )
    out["other_stores"] = root / "other-stores"
    return out


# -- teacher retrained ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "experiment, stale",
    [
        ("kd_ps_static", "adjusted-ps.zarr"),  # KA store from teacher A beside logits of teacher B
        ("kd_static", "dtd.zarr"),  # DTD store from teacher A beside logits of teacher B
    ],
)
def test_student_train_refuses_a_ka_or_dtd_store_of_the_teacher_before_it_was_retrained(
    tmp_path, pipeline, retrained, experiment, stale
):
    stores = tmp_path / "stores"
    shutil.copytree(retrained, stores)
    shutil.copytree(pipeline.teacher_stores / stale, stores / "t" / stale)
    if stale != "dtd.zarr":
        shutil.copytree(pipeline.teacher_stores / "dtd.zarr", stores / "t" / "dtd.zarr")
    result = _student(pipeline.params_path, experiment, data=pipeline.data, stores=stores, out=tmp_path)
    line = one_line_error(
        result,
        f"t/{stale}",
        "teacher.checkpoint_sha256",
        "in the store but",
        str(stores / "t" / "logits.zarr"),
        "rebuild",
    )
    assert line.count("checkpoint_sha256") == 1
    _assert_no_student_outputs(tmp_path)


def test_student_train_refuses_test_logits_of_another_teacher_than_the_train_logits(
    tmp_path, pipeline, retrained
):
    stores = tmp_path / "stores"
    shutil.copytree(pipeline.stores, stores)
    shutil.rmtree(stores / "t" / "test-logits.zarr")
    shutil.copytree(retrained / "t" / "test-logits.zarr", stores / "t" / "test-logits.zarr")
    result = _student(pipeline.params_path, "kd", data=pipeline.data, stores=stores, out=tmp_path)
    one_line_error(result, "test-logits.zarr", "another teacher checkpoint", "logits.zarr")
    _assert_no_student_outputs(tmp_path)


# -- the dataset changed under the stores ---------------------------------------------------


@pytest.mark.parametrize("variant", ["subset", "relabeled", "reordered"])
def test_student_train_refuses_stores_once_the_dataset_is_re_prepared_differently(
    tmp_path, pipeline, datasets, variant
):
    result = _student(
        pipeline.params_path, "kd", data=datasets[variant], stores=pipeline.stores, out=tmp_path
    )
    one_line_error(
        result,
        "logits.zarr",
        "dataset_fingerprint is",
        "in the store but",
        "in the prepared dataset (npz)",
        "stale",
    )
    _assert_no_student_outputs(tmp_path)


def test_student_train_refuses_a_store_dumped_from_another_dataset(tmp_path, pipeline, datasets):
    result = _student(
        pipeline.params_path, "kd", data=pipeline.data, stores=datasets["other_stores"], out=tmp_path
    )
    one_line_error(result, "dataset_fingerprint", "in the prepared dataset")
    _assert_no_student_outputs(tmp_path)


def test_student_train_refuses_a_store_whose_num_classes_differs(tmp_path, pipeline, work):
    zarr.open_group(work / "stores" / "t" / "logits.zarr", mode="r+").attrs["num_classes"] = 5
    result = _student(pipeline.params_path, "kd", data=pipeline.data, stores=work / "stores", out=tmp_path)
    one_line_error(result, "logits.zarr", "num_classes", "5 in the store", "4 in the prepared dataset")
    _assert_no_student_outputs(tmp_path)


def _reverse_sample_index(store: Path) -> None:
    array = zarr.open_group(store, mode="r+")["sample_index"]
    array[:] = array[:][::-1].copy()
    as_written(store)


def test_student_train_refuses_a_store_whose_rows_are_in_another_order(tmp_path, pipeline, work):
    _reverse_sample_index(work / "stores" / "t" / "logits.zarr")
    result = _student(pipeline.params_path, "kd", data=pipeline.data, stores=work / "stores", out=tmp_path)
    one_line_error(
        result,
        "logits.zarr",
        "sample_index",
        "prepared dataset",
        "row 0",
        f"sample {NUM_TRAIN - 1} in the store",
    )
    _assert_no_student_outputs(tmp_path)


@pytest.mark.parametrize("command", ["adjust", "temperature"])
def test_adjust_and_temperature_refuse_a_store_whose_rows_are_not_in_canonical_order(
    tmp_path, pipeline, work, command
):
    logits = work / "stores" / "t" / "logits.zarr"
    _reverse_sample_index(logits)
    out = tmp_path / "out.zarr"
    extra = ["--method", "ps"] if command == "adjust" else ["--histogram-out", tmp_path / "h.json"]
    result = cli(
        pipeline.params_path,
        command,
        *extra,
        "--logits",
        logits,
        "--out",
        out,
        "--metrics-out",
        tmp_path / "m.json",
    )
    one_line_error(result, "sample_index", "canonical order", "row 0", f"sample {NUM_TRAIN - 1}")
    assert leftovers(out) == [] and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("command", ["adjust", "temperature"])
def test_adjust_and_temperature_refuse_a_store_whose_num_classes_disagrees_with_its_logits(
    tmp_path, pipeline, work, command
):
    logits = work / "stores" / "t" / "logits.zarr"
    zarr.open_group(logits, mode="r+").attrs["num_classes"] = 10
    out = tmp_path / "out.zarr"
    extra = ["--method", "lsr"] if command == "adjust" else ["--histogram-out", tmp_path / "h.json"]
    result = cli(
        pipeline.params_path,
        command,
        *extra,
        "--logits",
        logits,
        "--out",
        out,
        "--metrics-out",
        tmp_path / "m.json",
    )
    one_line_error(result, "logits", "(1, 256, 4)", "(1, 256, 10)", "rebuild")
    assert leftovers(out) == []


def test_adjust_refuses_the_test_split_store(tmp_path, pipeline):
    out = tmp_path / "adjusted.zarr"
    result = cli(
        pipeline.params_path,
        "adjust",
        "--method",
        "ps",
        "--logits",
        pipeline.teacher_stores / "test-logits.zarr",
        "--out",
        out,
        "--metrics-out",
        tmp_path / "m.json",
    )
    one_line_error(result, "test-logits.zarr", "'test'-split", "logits.zarr")
    assert leftovers(out) == []


# -- import-logits ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(pipeline: Pipeline, tmp_path_factory) -> Path:
    """The session's train store exported to HDF5 (`lessons export`): logits, labels,
    sample_index and the store's attributes (its dataset fingerprint among them)."""
    path = tmp_path_factory.mktemp("export") / "t.h5"
    ok(cli(pipeline.params_path, "export", pipeline.teacher_stores / "logits.zarr", path))
    return path


def test_an_exported_store_imports_back_into_its_own_dataset(tmp_path, pipeline, exported):
    out = tmp_path / "logits.zarr"
    ok(cli(pipeline.params_path, "import-logits", exported, "--data", pipeline.data, "--out", out))
    from storage import open_store

    np.testing.assert_array_equal(
        open_store(out).read("logits"), open_store(pipeline.teacher_stores / "logits.zarr").read("logits")
    )


@pytest.mark.parametrize(
    "variant, fragments",
    [
        ("relabeled", ["dataset fingerprint", "the train split of"]),
        ("reordered", ["dataset fingerprint", "another dataset, subset or order"]),
        ("other", ["dataset fingerprint"]),
        ("subset", ["256 rows", "has 200"]),
    ],
)
def test_import_logits_refuses_an_export_of_another_dataset_subset_or_order(
    tmp_path, pipeline, datasets, exported, variant, fragments
):
    out = tmp_path / "logits.zarr"
    result = cli(pipeline.params_path, "import-logits", exported, "--data", datasets[variant], "--out", out)
    one_line_error(result, "t.h5", *fragments)
    assert leftovers(out) == []


def test_import_logits_refuses_foreign_logits_whose_labels_do_not_match(tmp_path, pipeline, datasets):
    """A file from elsewhere (no lessons attributes): the labels are what ties it to the data."""
    path = teacher_h5(pipeline.teacher_stores / "logits.zarr", tmp_path / "foreign.h5")
    out = tmp_path / "logits.zarr"
    result = cli(pipeline.params_path, "import-logits", path, "--data", datasets["relabeled"], "--out", out)
    one_line_error(result, "foreign.h5", "labels differ", "1 rows", "sample 5", "another dataset")
    assert leftovers(out) == []
    ok(cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out))


def _damage_one_chunk(array_dir: Path) -> Path:
    """Flip one byte in the middle of the array's first chunk file (bit rot, a bad copy)."""
    chunk = sorted(p for p in (array_dir / "c").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x5A
    chunk.write_bytes(bytes(data))
    return chunk


@pytest.mark.parametrize("command", ["student-train", "adjust", "temperature", "export"])
def test_a_chunk_damaged_on_disk_is_refused_by_its_checksum(tmp_path, pipeline, work, command):
    logits = work / "stores" / "t" / "logits.zarr"
    _damage_one_chunk(logits / "logits")
    out = tmp_path / "out.zarr"
    if command == "student-train":
        result = _student(
            pipeline.params_path, "kd", data=pipeline.data, stores=work / "stores", out=tmp_path
        )
    elif command == "export":
        result = cli(pipeline.params_path, "export", logits, tmp_path / "out.h5")
    else:
        extra = ["--method", "ps"] if command == "adjust" else ["--histogram-out", tmp_path / "h.json"]
        result = cli(
            pipeline.params_path,
            command,
            *extra,
            "--logits",
            logits,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
        )
    one_line_error(result, "logits.zarr", "crc32c", "rebuild")
    assert leftovers(out) == [] and not (tmp_path / "m.json").exists()
    _assert_no_student_outputs(tmp_path)
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


def test_every_store_array_is_written_with_a_crc32c_checksum_codec(pipeline):
    for name in ("logits.zarr", "adjusted-ps.zarr", "dtd.zarr"):
        group = zarr.open_group(pipeline.teacher_stores / name, mode="r")
        for array_name, array in group.arrays():
            codecs = [c["name"] for c in array.metadata.to_dict()["codecs"]]
            assert codecs[-1] == "crc32c", (name, array_name, codecs)


# -- derived stores name their source (DESIGN §8) ---------------------------------------------


@pytest.fixture(scope="module")
def redumped(pipeline: Pipeline, tmp_path_factory) -> Path:
    """stores/t/logits.zarr dumped again from the SAME checkpoint, in float32: another dump whose
    teacher attributes (checkpoint sha256, preprocessing) equal the session's."""
    root = tmp_path_factory.mktemp("redumped")
    params = write_params(root / "params.yaml", pipeline.params, teacher_dump={"dtype": "float32"})
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
            root / "stores" / "t" / "logits.zarr",
            "--test-out",
            root / "stores" / "t" / "test-logits.zarr",
        )
    )
    return root / "stores"


@pytest.mark.parametrize(
    "experiment, stale", [("kd_ps_static", "adjusted-ps.zarr"), ("kd_static", "dtd.zarr")]
)
def test_student_train_refuses_a_ka_or_dtd_store_derived_from_another_dump_of_the_same_checkpoint(
    tmp_path, pipeline, redumped, experiment, stale
):
    from storage import open_store

    stores = tmp_path / "stores"
    shutil.copytree(redumped, stores)
    for name in ("adjusted-ps.zarr", "dtd.zarr"):
        shutil.copytree(pipeline.teacher_stores / name, stores / "t" / name)
    # The teacher attributes agree: only the recorded source digest can tell the dumps apart.
    assert (
        open_store(stores / "t" / stale).attrs["teacher"]
        == open_store(stores / "t" / "logits.zarr").attrs["teacher"]
    )
    result = _student(pipeline.params_path, experiment, data=pipeline.data, stores=stores, out=tmp_path)
    one_line_error(result, f"t/{stale}", "derived from", "content digest", "rebuild")
    _assert_no_student_outputs(tmp_path)


def test_derived_stores_record_the_digest_of_the_logits_they_came_from_and_its_sample_index(pipeline):
    from storage import open_store
    from storage.soft_labels import content_digest

    logits = open_store(pipeline.teacher_stores / "logits.zarr")
    assert logits.attrs["content_digest"] == content_digest(logits.path)  # recorded = recomputed
    for name in ("adjusted-ps.zarr", "adjusted-lsr.zarr", "dtd.zarr"):
        derived = open_store(pipeline.teacher_stores / name)
        assert derived.attrs["source"] == {
            "store": "logits.zarr",
            "content_digest": logits.attrs["content_digest"],
        }
        assert np.array_equal(derived.read("sample_index"), logits.read("sample_index"))
        derived.expect_source(logits)


def test_the_content_digest_changes_with_one_stored_value(tmp_path, pipeline):
    from storage.soft_labels import content_digest

    copy = tmp_path / "logits.zarr"
    shutil.copytree(pipeline.teacher_stores / "logits.zarr", copy, ignore=shutil.ignore_patterns("*.lock"))
    before = content_digest(copy)
    array = zarr.open_array(copy / "logits", mode="r+")
    array[0, 3, 1] = float(array[0, 3, 1]) + 1.0
    assert content_digest(copy) != before


def test_student_train_refuses_a_derived_store_whose_sample_index_differs_from_its_source(
    tmp_path, pipeline, work
):
    stores = work / "stores"
    index = zarr.open_array(stores / "t" / "adjusted-ps.zarr" / "sample_index", mode="r+")
    index[:] = np.roll(np.arange(NUM_TRAIN), 1)
    as_written(stores / "t" / "adjusted-ps.zarr")
    result = _student(pipeline.params_path, "kd_ps_static", data=pipeline.data, stores=stores, out=tmp_path)
    one_line_error(
        result, "adjusted-ps.zarr", "sample_index does not match", str(stores / "t" / "logits.zarr")
    )
    _assert_no_student_outputs(tmp_path)


@pytest.mark.parametrize("array", ["labels", "logits"])
def test_a_store_edited_in_place_after_it_was_written_is_refused_by_every_consumer(
    tmp_path, pipeline, work, array
):
    """Labels rewritten by hand (all 0) or one logit changed: the chunks are valid and their
    checksums fine, only the recorded content digest can tell."""
    store = work / "stores" / "t" / "logits.zarr"
    values = zarr.open_group(store, mode="r+")[array]
    if array == "labels":
        values[:] = 0
    else:
        values[0, 3, 1] = float(values[0, 3, 1]) + 1.0
    result = _student(pipeline.params_path, "kd", data=pipeline.data, stores=work / "stores", out=tmp_path)
    one_line_error(result, str(store), "changed after it was written", "dvc repro --force teacher_dump@t")
    _assert_no_student_outputs(tmp_path)
    adjust = cli(
        pipeline.params_path,
        "adjust",
        "--method",
        "ps",
        "--logits",
        store,
        "--out",
        tmp_path / "a.zarr",
        "--metrics-out",
        tmp_path / "m.json",
    )
    one_line_error(adjust, "changed after it was written")
    assert leftovers(tmp_path / "a.zarr") == []
