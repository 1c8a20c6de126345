"""A clear error for every bad input: one `Error: ...` line, a non-zero exit, no partial output,
and any older output at the same path left exactly as it was."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from storage import open_store
from tests.reliability.conftest import (
    NUM_CLASSES,
    NUM_TRAIN,
    as_written,
    base_params,
    cli,
    leftovers,
    make_npz,
    one_line_error,
    tree_digest,
    write_params,
)

# -- datasets (prepare-data) -------------------------------------------------------------------


def _prepare(tmp_path: Path, params: dict, **data) -> tuple[Path, object]:
    path = write_params(tmp_path / "params.yaml", params, data=data)
    out = tmp_path / "data"
    return out, cli(path, "prepare-data", "--out", out)


def test_a_missing_dataset_root_is_one_line_naming_the_path(tmp_path, pipeline):
    out, result = _prepare(tmp_path, pipeline.params, root=str(tmp_path / "nowhere.npz"))
    one_line_error(result, "data.root", "nowhere.npz", "does not exist")
    assert leftovers(out) == []


def test_an_unknown_dataset_name_suggests_the_closest_one(tmp_path, pipeline):
    out, result = _prepare(tmp_path, pipeline.params, name="cifar1O")
    one_line_error(result, "'cifar1O'", "'cifar10'", "fashion_mnist")
    assert leftovers(out) == []


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "not a zip"])
def test_a_corrupt_npz_is_one_line_and_an_older_prepared_folder_is_untouched(tmp_path, pipeline, damage):
    raw = pipeline.npz.read_bytes()
    bad = tmp_path / "bad.npz"
    if damage == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped byte":
        flipped = bytearray(raw)
        flipped[len(raw) // 3] ^= 0xFF  # inside x_train's member: a CRC mismatch
        bad.write_bytes(bytes(flipped))
    else:
        bad.write_bytes(b"\x00" * 64)
    shutil.copytree(pipeline.data, tmp_path / "data")
    before = tree_digest(tmp_path / "data")
    out, result = _prepare(tmp_path, pipeline.params, root=str(bad))
    one_line_error(result, "bad.npz", "intact copy")
    assert tree_digest(out) == before
    assert leftovers(out) == ["data"]


def _idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.mark.parametrize(
    "damage, fragments",
    [
        ("bad magic", ["train-images-idx3-ubyte.gz", "magic number", "intact copy"]),
        ("truncated", ["train-labels-idx1-ubyte.gz", "truncated", "intact copy"]),
        ("not gzip", ["t10k-images-idx3-ubyte.gz", "gzip"]),
        ("missing", ["t10k-labels-idx1-ubyte.gz"]),
    ],
)
def test_a_corrupt_or_missing_idx_file_is_one_line_naming_the_file(tmp_path, pipeline, damage, fragments):
    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    target = {
        "bad magic": "train-images-idx3-ubyte.gz",
        "truncated": "train-labels-idx1-ubyte.gz",
        "not gzip": "t10k-images-idx3-ubyte.gz",
        "missing": "t10k-labels-idx1-ubyte.gz",
    }[damage]
    raw = gzip.decompress((root / target).read_bytes())
    if damage == "bad magic":
        (root / target).write_bytes(gzip.compress(b"\x00\x00\x09\x03" + raw[4:]))
    elif damage == "truncated":
        (root / target).write_bytes(gzip.compress(raw[:-3]))
    elif damage == "not gzip":
        (root / target).write_bytes(raw)
    else:
        (root / target).unlink()
    out, result = _prepare(tmp_path, pipeline.params, name="fashion_mnist", root=str(root))
    one_line_error(result, *fragments)
    assert leftovers(out) == []


def test_an_empty_dataset_split_is_refused(tmp_path, pipeline):
    npz = make_npz(tmp_path / "empty.npz", num_train=0)
    out, result = _prepare(tmp_path, pipeline.params, root=str(npz))
    one_line_error(result, "the train split", "is empty")
    assert leftovers(out) == []


def test_dataset_labels_outside_the_classes_are_refused_with_the_row(tmp_path, pipeline):
    labels = np.arange(NUM_TRAIN) % NUM_CLASSES
    labels[17] = 7
    npz = make_npz(tmp_path / "labels.npz", y_train=labels)
    out, result = _prepare(tmp_path, pipeline.params, root=str(npz))
    one_line_error(result, "label 7", "row 17", "[0, 4)")
    assert leftovers(out) == []


# -- params.yaml -----------------------------------------------------------------------------


def test_a_misspelled_params_key_is_named_with_a_suggestion(tmp_path, pipeline):
    params = base_params(pipeline.npz)
    params["teacher_dump"]["chunk_sise"] = params["teacher_dump"].pop("chunk_size")
    path = write_params(tmp_path / "params.yaml", params)
    out = tmp_path / "logits.zarr"
    result = cli(
        path,
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
        tmp_path / "test.zarr",
    )
    one_line_error(result, "teacher_dump", "'chunk_sise'", "'chunk_size'")
    assert leftovers(out) == []


@pytest.mark.parametrize(
    "text, fragment",
    [
        (None, "cannot read the parameters file"),
        ("data: [unclosed\n", "not valid YAML"),
        ("- a list\n", "the top level must be a mapping"),
        ("mystery: {}\n", "unknown key 'mystery'"),
        ("student_train: {lr: .nan}\n", "student_train.lr"),
    ],
)
def test_a_broken_params_file_is_one_line(tmp_path, pipeline, text, fragment):
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    result = cli(path, "prepare-data", "--out", tmp_path / "data")
    one_line_error(result, fragment)
    assert leftovers(tmp_path / "data") == []


# -- architectures and checkpoints ------------------------------------------------------------


def _teacher_params(tmp_path: Path, pipeline, **teacher) -> Path:
    spec = {**pipeline.params["teacher_train"]["teachers"]["t"], **teacher}
    return write_params(tmp_path / "params.yaml", pipeline.params, teacher_train={"teachers": {"t": spec}})


def _teacher_train(params: Path, tmp_path: Path, pipeline):
    return cli(
        params,
        "teacher-train",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint-out",
        tmp_path / "t.pt",
        "--metrics-out",
        tmp_path / "t.json",
        "--curve-out",
        tmp_path / "c.json",
    )


def _no_teacher_outputs(tmp_path: Path) -> None:
    assert not any((tmp_path / n).exists() for n in ("t.pt", "t.json", "c.json", "t.pt.state"))


def test_an_unknown_teacher_architecture_suggests_the_closest_one(tmp_path, pipeline):
    result = _teacher_train(_teacher_params(tmp_path, pipeline, arch="resnet2O"), tmp_path, pipeline)
    one_line_error(result, "'resnet2O'", "resnet20")
    _no_teacher_outputs(tmp_path)


def test_an_unknown_student_architecture_is_refused_before_training(tmp_path, pipeline):
    params = write_params(tmp_path / "params.yaml", pipeline.params, student_train={"arch": "mpl"})
    result = cli(
        params,
        "student-train",
        "--experiment",
        "ce",
        "--data",
        pipeline.data,
        "--stores",
        pipeline.stores,
        "--checkpoint-out",
        tmp_path / "s.pt",
        "--metrics-out",
        tmp_path / "s.json",
        "--curve-out",
        tmp_path / "c.json",
    )
    one_line_error(result, "'mpl'", "'mlp'")
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "s.json").exists()


def test_a_batch_larger_than_the_training_split_is_refused_before_any_allocation(tmp_path, pipeline):
    # drop_last would leave no step at all; the loader would try to allocate 10^9 images first.
    result = _teacher_train(_teacher_params(tmp_path, pipeline, batch_size=10**9), tmp_path, pipeline)
    one_line_error(
        result, "teacher_train.teachers.t", "batch_size 1000000000", "256 training images", "lower batch_size"
    )
    _no_teacher_outputs(tmp_path)
    params = write_params(tmp_path / "params.yaml", pipeline.params, student_train={"batch_size": 257})
    result = cli(
        params,
        "student-train",
        "--experiment",
        "kd",
        "--data",
        pipeline.data,
        "--stores",
        pipeline.stores,
        "--checkpoint-out",
        tmp_path / "s.pt",
        "--metrics-out",
        tmp_path / "s.json",
        "--curve-out",
        tmp_path / "c.json",
    )
    one_line_error(
        result, "student_train.experiments.kd", "batch_size 257", "256 training images", "lower batch_size"
    )
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "s.json").exists()


def test_a_given_checkpoint_of_another_architecture_is_refused(tmp_path, pipeline):
    params = _teacher_params(tmp_path, pipeline, arch="cnn_tiny", checkpoint=str(pipeline.checkpoint))
    result = _teacher_train(params, tmp_path, pipeline)
    one_line_error(result, "t.pt", "'mlp'", "'cnn_tiny'")
    _no_teacher_outputs(tmp_path)


def test_a_bare_state_dict_of_another_architecture_is_refused(tmp_path, pipeline):
    import nets

    bare = tmp_path / "bare.pt"
    torch.save(nets.build_net("cnn_tiny", NUM_CLASSES, in_channels=1, image_size=28).state_dict(), bare)
    params = _teacher_params(tmp_path, pipeline, arch="mlp", checkpoint=str(bare))
    result = _teacher_train(params, tmp_path, pipeline)
    one_line_error(result, "bare.pt", "weights", "'mlp'")
    _no_teacher_outputs(tmp_path)


def test_a_checkpoint_for_another_class_count_is_refused_by_teacher_train_and_teacher_dump(
    tmp_path, pipeline
):
    import nets

    bare = tmp_path / "ten.pt"
    torch.save(nets.build_net("mlp", 10, in_channels=1, image_size=28).state_dict(), bare)
    result = _teacher_train(_teacher_params(tmp_path, pipeline, checkpoint=str(bare)), tmp_path, pipeline)
    one_line_error(result, "ten.pt", "weights", "'mlp'", "size mismatch")
    _no_teacher_outputs(tmp_path)

    payload = torch.load(pipeline.checkpoint, weights_only=True)
    payload.update(num_classes=10, state_dict=nets.build_net("mlp", 10, 1, 28).state_dict())
    torch.save(payload, tmp_path / "ten-full.pt")
    out = tmp_path / "logits.zarr"
    result = cli(
        pipeline.params_path,
        "teacher-dump",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint",
        tmp_path / "ten-full.pt",
        "--out",
        out,
        "--test-out",
        tmp_path / "test.zarr",
    )
    one_line_error(result, "ten-full.pt", "10 classes", "has 4")
    assert leftovers(out) == []


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, pipeline):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    out = tmp_path / "logits.zarr"
    result = cli(
        pipeline.params_path,
        "teacher-dump",
        "--teacher",
        "t",
        "--data",
        pipeline.data,
        "--checkpoint",
        junk,
        "--out",
        out,
        "--test-out",
        tmp_path / "test.zarr",
    )
    one_line_error(result, "junk.pt", "torch checkpoint")
    assert leftovers(out) == []


# -- HDF5 imports ------------------------------------------------------------------------------


def _h5(path: Path, **arrays) -> Path:
    with h5py.File(path, "w") as f:
        for name, value in arrays.items():
            f[name] = value
    return path


@pytest.fixture
def good_h5(pipeline) -> dict[str, np.ndarray]:
    store = open_store(pipeline.teacher_stores / "logits.zarr")
    return {"logits": store.read("logits")[0].astype(np.float32), "labels": store.read("labels")}


def _bad_h5(good: dict[str, np.ndarray], case: str) -> dict[str, np.ndarray]:
    arrays = {k: v.copy() for k, v in good.items()}
    if case == "nan":
        arrays["logits"][200, 1] = np.nan
    elif case == "inf":
        arrays["logits"][3, 0] = -np.inf
    elif case == "float16 overflow":
        arrays["logits"][100, 2] = 1e5
    elif case == "labels out of range":
        arrays["labels"][9] = NUM_CLASSES
    elif case == "negative label":
        arrays["labels"][0] = -1
    elif case == "logits 1-D":
        arrays["logits"] = arrays["logits"].reshape(-1)
    elif case == "logits 4-D":
        arrays["logits"] = arrays["logits"][None, None]
    elif case == "short labels":
        arrays["labels"] = arrays["labels"][:-1]
    elif case == "float labels":
        arrays["labels"] = arrays["labels"] + 0.25
    elif case == "short sample_index":
        arrays["sample_index"] = np.arange(NUM_TRAIN - 1)
    elif case == "repeated sample_index":
        arrays["sample_index"] = np.zeros(NUM_TRAIN, dtype=np.int64)
    elif case == "view_params of another N":
        arrays["view_params"] = np.zeros((1, NUM_TRAIN - 1, 3), dtype=np.int16)
    elif case == "too many classes":
        arrays["logits"] = np.concatenate([arrays["logits"], arrays["logits"][:, :1]], axis=1)
    elif case == "no logits":
        arrays["scores"] = arrays.pop("logits")
    elif case == "no alignment":
        del arrays["labels"]
    return arrays


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("nan", ["'logits'", "1 NaN/inf"]),
        ("inf", ["'logits'", "1 NaN/inf"]),
        ("float16 overflow", ["1e+05", "float16", "65504", "float32"]),
        ("labels out of range", ["label 4", "sample 9", "[0, 4)"]),
        ("negative label", ["label -1", "sample 0", "[0, 4)"]),
        ("logits 1-D", ["'logits'", "(N, C) or (V, N, C)"]),
        ("logits 4-D", ["'logits'", "(N, C) or (V, N, C)"]),
        ("short labels", ["'labels'", "(256,)", "(255,)"]),
        ("float labels", ["'labels'", "integer", "float64"]),
        ("short sample_index", ["'sample_index'", "(256,)", "(255,)"]),
        ("repeated sample_index", ["'sample_index'", "permutation of 0..255"]),
        ("view_params of another N", ["'view_params'", "(1, 256, P)", "(1, 255, 3)"]),
        ("too many classes", ["5 classes", "npz has 4"]),
        ("no logits", ["no dataset", "'logits'"]),
        ("no alignment", ["'sample_index'", "'labels'"]),
    ],
)
def test_a_bad_h5_import_is_one_line_and_an_older_store_at_the_path_is_untouched(
    tmp_path, pipeline, good_h5, case, fragments
):
    path = _h5(tmp_path / "bad.h5", **_bad_h5(good_h5, case))
    out = tmp_path / "logits.zarr"
    shutil.copytree(pipeline.teacher_stores / "logits.zarr", out)
    before = tree_digest(out)
    result = cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out)
    one_line_error(result, "bad.h5", *fragments)
    assert tree_digest(out) == before
    assert leftovers(out) == ["logits.zarr"]  # the old store, and no .partial beside it
    open_store(out)


def test_an_h5_import_that_fails_leaves_no_output_when_there_was_none(tmp_path, pipeline, good_h5):
    path = _h5(tmp_path / "bad.h5", **_bad_h5(good_h5, "nan"))
    out = tmp_path / "logits.zarr"
    one_line_error(cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out))
    assert leftovers(out) == []


def test_a_file_that_is_not_hdf5_is_refused(tmp_path, pipeline):
    path = tmp_path / "fake.h5"
    path.write_text("hello")
    out = tmp_path / "logits.zarr"
    result = cli(pipeline.params_path, "import-logits", path, "--data", pipeline.data, "--out", out)
    one_line_error(result, "fake.h5", "HDF5")
    assert leftovers(out) == []


# -- damaged stores -----------------------------------------------------------------------------


def _consume(pipeline, tmp_path: Path, command: str, stores: Path):
    """Run a consumer of stores/t/logits.zarr; returns (result, its main output path)."""
    logits = stores / "t" / "logits.zarr"
    out = tmp_path / "out.zarr"
    if command == "adjust":
        args = [
            "adjust",
            "--method",
            "ps",
            "--logits",
            logits,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
        ]
    elif command == "temperature":
        args = [
            "temperature",
            "--logits",
            logits,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
            "--histogram-out",
            tmp_path / "h.json",
        ]
    else:
        out = tmp_path / "s.pt"
        args = [
            "student-train",
            "--experiment",
            "kd",
            "--data",
            pipeline.data,
            "--stores",
            stores,
            "--checkpoint-out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
            "--curve-out",
            tmp_path / "c.json",
        ]
    return cli(pipeline.params_path, *args), out


CONSUMERS = ["adjust", "temperature", "student-train"]


@pytest.mark.parametrize("command", [*CONSUMERS, "export"])
def test_a_store_with_a_missing_logits_chunk_is_refused_as_damaged_not_as_nan(
    tmp_path, pipeline, work, command
):
    store = work / "stores" / "t" / "logits.zarr"
    (store / "logits" / "c" / "0" / "1" / "0").unlink()  # samples 64..127; zarr would read NaN there
    if command == "export":
        result, out = cli(pipeline.params_path, "export", store, tmp_path / "out.h5"), tmp_path / "out.h5"
    else:
        result, out = _consume(pipeline, tmp_path, command, work / "stores")
    line = one_line_error(
        result,
        str(store),
        "logits/c/0/1/0",
        "samples 64..127",
        "missing",
        "damaged or incomplete",
        "dvc repro --force teacher_dump@t",
    )
    assert "NaN" not in line and "float16" not in line
    assert leftovers(out) == [] and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "chunk, stage",
    [
        ("adjusted-ps.zarr/target_logits/c/0/2/0", "adjust@t-ps"),
        ("dtd.zarr/static_temperature/c/0/3", "temperature@t"),
        ("test-logits.zarr/logits/c/0/0/0", "teacher_dump@t"),
        ("logits.zarr/sample_index/c/1", "teacher_dump@t"),
    ],
)
def test_a_missing_chunk_of_any_store_student_train_reads_names_the_store_and_the_stage(
    tmp_path, pipeline, work, chunk, stage
):
    (work / "stores" / "t" / chunk).unlink()
    store, array_chunk = chunk.split("/", 1)
    result = cli(
        pipeline.params_path,
        "student-train",
        "--experiment",
        "kd_ps_static",
        "--data",
        pipeline.data,
        "--stores",
        work / "stores",
        "--checkpoint-out",
        tmp_path / "s.pt",
        "--metrics-out",
        tmp_path / "m.json",
        "--curve-out",
        tmp_path / "c.json",
    )
    line = one_line_error(
        result,
        str(work / "stores" / "t" / store),
        f"chunk {array_chunk}",
        "is missing",
        f"dvc repro --force {stage}",
    )
    assert "NaN" not in line and "float16" not in line
    assert not (tmp_path / "s.pt").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("command", CONSUMERS)
def test_a_store_with_nan_and_inf_logits_is_refused(tmp_path, pipeline, work, command):
    array = zarr.open_group(work / "stores" / "t" / "logits.zarr", mode="r+")["logits"]
    array[0, 70, 1] = np.nan
    array[0, 130, 0] = np.inf
    as_written(work / "stores" / "t" / "logits.zarr")
    result, out = _consume(pipeline, tmp_path, command, work / "stores")
    line = one_line_error(result, str(work / "stores" / "t" / "logits.zarr"), "NaN", "inf")
    if command == "student-train":
        assert "first: sample 70" in line
    else:  # dask may meet either damaged block first
        assert "samples 64..127" in line or "samples 128..191" in line
    assert leftovers(out) == [] and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("command", CONSUMERS)
def test_a_store_of_another_schema_version_is_refused(tmp_path, pipeline, work, command):
    meta_path = work / "stores" / "t" / "logits.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["schema_version"] = 0
    meta_path.write_text(json.dumps(meta))
    result, out = _consume(pipeline, tmp_path, command, work / "stores")
    one_line_error(result, "logits.zarr", "schema_version 0", "rebuild")
    assert leftovers(out) == []


@pytest.mark.parametrize("command", CONSUMERS)
def test_a_store_that_was_never_finalized_is_refused(tmp_path, pipeline, work, command):
    store = work / "stores" / "t" / "logits.zarr"
    store.rename(store.with_name("logits.zarr.partial"))
    result, out = _consume(pipeline, tmp_path, command, work / "stores")
    one_line_error(result, "logits.zarr", "unfinished write", "rerun the stage")
    assert leftovers(out) == []


def test_store_labels_outside_the_classes_are_refused_by_adjust(tmp_path, pipeline, work):
    zarr.open_group(work / "stores" / "t" / "logits.zarr", mode="r+")["labels"][130] = -1
    as_written(work / "stores" / "t" / "logits.zarr")
    result, out = _consume(pipeline, tmp_path, "adjust", work / "stores")
    one_line_error(result, "labels", "[0, 4)", "rebuild")
    assert leftovers(out) == []


# -- outputs that cannot be written ------------------------------------------------------------


@pytest.mark.parametrize(
    "command", ["prepare-data", "teacher-dump", "adjust", "temperature", "import-logits", "export"]
)
def test_an_output_path_under_a_regular_file_is_one_line_not_writable(tmp_path, pipeline, good_h5, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file")
    out = blocker / "sub" / "out.zarr"
    logits = pipeline.teacher_stores / "logits.zarr"
    args = {
        "prepare-data": ["prepare-data", "--out", out],
        "teacher-dump": [
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
            blocker / "test.zarr",
        ],
        "adjust": [
            "adjust",
            "--method",
            "ps",
            "--logits",
            logits,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
        ],
        "temperature": [
            "temperature",
            "--logits",
            logits,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
            "--histogram-out",
            tmp_path / "h.json",
        ],
        "import-logits": [
            "import-logits",
            _h5(tmp_path / "ok.h5", **good_h5),
            "--data",
            pipeline.data,
            "--out",
            out,
        ],
        "export": ["export", logits, blocker / "sub" / "out.h5"],
    }[command]
    one_line_error(
        cli(pipeline.params_path, *args), str(blocker / "sub"), "not writable", "another output path"
    )
    assert blocker.read_text() == "I am a file"
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "command, blocked",
    [
        ("teacher-train", "checkpoint"),
        ("student-train", "checkpoint"),
        ("student-train", "metrics"),
    ],
)
def test_an_unwritable_training_output_fails_before_any_training(tmp_path, pipeline, command, blocked):
    blocker = tmp_path / "a-file"
    blocker.write_text("I am a file")
    paths = {name: tmp_path / f"{name}.out" for name in ("checkpoint", "metrics", "curve")}
    paths[blocked] = blocker / "sub" / f"{blocked}.out"
    outputs = [
        "--checkpoint-out",
        paths["checkpoint"],
        "--metrics-out",
        paths["metrics"],
        "--curve-out",
        paths["curve"],
    ]
    if command == "teacher-train":
        args = ["teacher-train", "--teacher", "t", "--data", pipeline.data, *outputs]
    else:
        args = [
            "student-train",
            "--experiment",
            "kd_ps_static",
            "--data",
            pipeline.data,
            "--stores",
            pipeline.stores,
            *outputs,
        ]
    result = cli(pipeline.params_path, *args)
    one_line_error(result, str(blocker / "sub"), "not writable")
    assert "epoch 1/" not in result.output  # refused before the first epoch, not after it
    assert not any(p.exists() for p in paths.values())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_an_output_in_a_read_only_folder_is_one_line_not_writable(tmp_path, pipeline):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = cli(
            pipeline.params_path,
            "adjust",
            "--method",
            "ps",
            "--logits",
            pipeline.teacher_stores / "logits.zarr",
            "--out",
            folder / "a.zarr",
            "--metrics-out",
            tmp_path / "m.json",
        )
        one_line_error(result, "not writable", "Permission denied")
    finally:
        folder.chmod(0o700)


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["import-logits", "adjust", "temperature", "teacher-dump"])
def test_a_full_disk_is_one_line_and_leaves_no_store_and_the_older_one_intact(
    tmp_path, pipeline, good_h5, monkeypatch, command
):
    logits = pipeline.teacher_stores / "logits.zarr"
    out = tmp_path / "out.zarr"
    existing = {
        "import-logits": logits,
        "adjust": pipeline.teacher_stores / "adjusted-ps.zarr",
        "temperature": pipeline.teacher_stores / "dtd.zarr",
        "teacher-dump": logits,
    }[command]
    shutil.copytree(existing, out)
    before = tree_digest(out)
    args = {
        "import-logits": [
            "import-logits",
            _h5(tmp_path / "ok.h5", **good_h5),
            "--data",
            pipeline.data,
            "--out",
            out,
        ],
        "adjust": [
            "adjust",
            "--method",
            "ps",
            "--logits",
            logits,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
        ],
        "temperature": [
            "temperature",
            "--logits",
            logits,
            "--out",
            out,
            "--metrics-out",
            tmp_path / "m.json",
            "--histogram-out",
            tmp_path / "h.json",
        ],
        "teacher-dump": [
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
            tmp_path / "test.zarr",
        ],
    }[command]
    monkeypatch.setattr(zarr.Array, "__setitem__", _disk_full)  # every array write of the store
    result = cli(pipeline.params_path, *args)
    monkeypatch.undo()
    one_line_error(result, "out.zarr.partial", "no space left", "free some disk space")
    assert tree_digest(out) == before  # the older store is exactly as it was
    assert leftovers(out) == ["out.zarr"]  # and nothing half-written beside it
    open_store(out)
    assert not (tmp_path / "m.json").exists()


def test_a_full_disk_while_marking_a_chunk_is_one_line_too(tmp_path, pipeline, good_h5, monkeypatch):
    import storage.atomic as atomic
    import storage.soft_labels as soft_labels

    out = tmp_path / "out.zarr"
    real = atomic.atomic_write_bytes

    def full_for_marks(path, payload):
        if "/.lessons/done/" in str(path):
            try:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as exc:
                raise atomic.OutputError(exc.errno, atomic.describe_os_error(exc, path)) from exc
        return real(path, payload)

    monkeypatch.setattr(soft_labels, "atomic_write_bytes", full_for_marks)
    result = cli(
        pipeline.params_path,
        "import-logits",
        _h5(tmp_path / "ok.h5", **good_h5),
        "--data",
        pipeline.data,
        "--out",
        out,
    )
    monkeypatch.undo()
    one_line_error(result, "no space left on the device")
    assert leftovers(out) == []


# -- an output path that holds something else ------------------------------------------------


@pytest.mark.parametrize("command", ["adjust", "temperature"])
@pytest.mark.parametrize("victim", ["folder", "file", "other-kind store"])
def test_a_store_output_path_holding_something_else_is_refused_and_kept(
    tmp_path, pipeline, work, command, victim
):
    logits = work / "stores" / "t" / "logits.zarr"
    if victim == "folder":
        out = tmp_path / "mine"
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    elif victim == "file":
        out = tmp_path / "params-copy.yaml"
        out.write_text("data: {}\n")
    else:  # adjust into the DTD store, temperature into the KA store
        out = work / "stores" / "t" / ("dtd.zarr" if command == "adjust" else "adjusted-ps.zarr")
    before = tree_digest(out) if out.is_dir() else out.read_bytes()
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
    if victim == "other-kind store":
        one_line_error(result, out.name, "store of kind", "another output path")
    else:
        one_line_error(result, str(out), victim, "only replaces its own outputs")
    assert (tree_digest(out) if out.is_dir() else out.read_bytes()) == before
    assert not (tmp_path / "m.json").exists() and not out.with_name(out.name + ".old").exists()


def test_prepare_data_refuses_an_output_folder_that_is_not_a_prepared_dataset(tmp_path, pipeline):
    out = tmp_path / "data"
    out.mkdir()
    (out / "thesis.tex").write_text("\\documentclass{article}")
    path = write_params(tmp_path / "params.yaml", pipeline.params)
    result = cli(path, "prepare-data", "--out", out)
    one_line_error(result, str(out), "not a prepared dataset")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_temperature_with_an_unwritable_plot_path_fails_before_writing_anything(tmp_path, pipeline):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "dtd.zarr"
    result = cli(
        pipeline.params_path,
        "temperature",
        "--logits",
        pipeline.teacher_stores / "logits.zarr",
        "--out",
        out,
        "--metrics-out",
        tmp_path / "m.json",
        "--histogram-out",
        tmp_path / "h.json",
        "--plot-out",
        blocker / "t.png",
    )
    one_line_error(result, "t.png", "not writable", "another output path")
    assert leftovers(out) == [] and not (tmp_path / "m.json").exists() and not (tmp_path / "h.json").exists()
