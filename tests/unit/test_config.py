"""Typed, strict params.yaml loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, Params, TeacherDumpConfig, from_dict, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_params_yaml_loads_and_names_six_student_experiments():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert set(params.student_train.experiments) == {"ce", "kd", "kd_ps", "kd_lsr", "kd_flsw", "kd_ps_flsw"}
    assert params.adjust.methods == ("ps", "lsr")
    kd_ps_flsw = params.student_train.experiment("kd_ps_flsw")
    assert (kd_ps_flsw.adjust, kd_ps_flsw.dtd, kd_ps_flsw.arch) == ("ps", "flsw", params.student_train.arch)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dat": {}}, "params.yaml: unknown key 'dat' (did you mean 'data'?)"),
        ({"data": {"nmae": "x"}}, "data: unknown key 'nmae' (did you mean 'name'?)"),
        (
            {"teacher_train": {"teachers": {"t": {"epochs": 1}}}},
            "teacher_train.teachers.t: missing required key 'arch'",
        ),
        (
            {"adjust": {"methods": ["ps", "pz"]}},
            "adjust.methods[1]: must be one of ['ps', 'lsr', 'none'], got 'pz'",
        ),
        ({"adjust": {"epsilon": 1.5}}, "adjust.epsilon: must lie in (0, 1), got 1.5"),
        ({"data": {"max_train_samples": "all"}}, "data.max_train_samples: must be an integer, got 'all'"),
        (
            {"data": {"max_train_samples": 0}},
            "data.max_train_samples: must be null or a positive integer, got 0",
        ),
        ({"student_train": {"epochs": True}}, "student_train.epochs: must be an integer, got true"),
        ({"student_train": {"seeds": [1, 1]}}, "student_train.seeds: must be a non-empty list of distinct"),
        ({"temperature": {"min_temperature": 0.0}}, "temperature: need 0 < min_temperature"),
        (
            {"teacher_dump": {"batch_size": 1000, "chunk_size": 16384}},
            "must be a multiple of batch_size (1000)",
        ),
        (
            {
                "student_train": {
                    "experiments": {"a": {"teacher": "t", "adjust": "ps", "fixed_target_temperature": 1}}
                }
            },
            "student_train.experiments.a.fixed_target_temperature: "
            "a positive number, and only with adjust: lsr",
        ),
        (
            {
                "student_train": {
                    "experiments": {"a": {"teacher": "t", "adjust": "lsr", "fixed_target_temperature": 0}}
                }
            },
            "student_train.experiments.a.fixed_target_temperature: a positive number",
        ),
        ({"student_train": {"momentum": -1}}, "student_train.momentum: must lie in [0, 1), got -1"),
        ({"student_train": {"weight_decay": -1}}, "student_train.weight_decay: must be >= 0, got -1"),
        ({"student_train": {"num_workers": -1}}, "student_train.num_workers: must be positive, got -1"),
        ({"student_train": {"nproc": 0}}, "student_train.nproc: must be positive, got 0"),
        ({"student_train": {"nproc": True}}, "student_train.nproc"),
        ({"student_train": {"amp": "yes"}}, "student_train.amp"),
        (
            {"student_train": {"nproc": 4, "batch_size": 30}},
            "student_train.batch_size: 30 is not divisible by student_train.nproc 4",
        ),
        (
            {"student_train": {"nproc": 2, "experiments": {"a": {"kd": False, "batch_size": 33}}}},
            "student_train.experiments.a.batch_size: 33 is not divisible by student_train.nproc 2",
        ),
        ({"prepare_data": {"num_workers": 0}}, "prepare_data.num_workers: must be positive, got 0"),
        (
            {"teacher_train": {"teachers": {"t": {"arch": "x", "weight_decay": -1}}}},
            "teacher_train.teachers.t.weight_decay: must be >= 0",
        ),
        (
            {"student_train": {"schedule": "step", "milestones": []}},
            "a step schedule needs at least one milestone",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "alpha": 1.5}}}},
            "student_train.experiments.a.alpha: must lie in [0, 1], got 1.5",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "epochs": 0}}}},
            "student_train.experiments.a.epochs: must be positive, got 0",
        ),
        ({"student_train": {"seeds": [-1]}}, "student_train.seeds: a seed must lie in [0, 2^32), got -1"),
        ({"student_train": {"seeds": [2**70]}}, "student_train.seeds: a seed must lie in [0, 2^32)"),
        ({"data": {"seed": -3}}, "data.seed: a seed must lie in [0, 2^32), got -3"),
        (
            {"data": {"validation_fraction": 1.0}},
            "data.validation_fraction: must lie in [0, 1) (0.0 = no validation split), got 1.0",
        ),
        ({"data": {"validation_fraction": -0.1}}, "data.validation_fraction: must lie in [0, 1)"),
        ({"data": {"validation_fraction": "10%"}}, "data.validation_fraction: must be a number, got '10%'"),
        (
            {"teacher_train": {"teachers": {"big-config": {"arch": "x"}}}},
            "teacher_train.teachers.big-config: a teacher name must not end in -config or -curve",
        ),
        ({"adjust": {"methods": ["ps", "ps"]}}, "adjust.methods: each method once, got ['ps', 'ps']"),
        ({"temperature": {"gamma": -1}}, "temperature.gamma: the FLSW exponent must be >= 0, got -1"),
        (
            {"student_train": {"schedule": "linear"}},
            "student_train.schedule: must be one of ['cosine', 'step']",
        ),
        (
            {"student_train": {"milestones": [0.75, 0.5]}},
            "student_train.milestones: must be increasing fractions",
        ),
        (
            {"student_train": {"milestones": [150, 180]}},
            "student_train.milestones: must be increasing fractions",
        ),
        (
            {"student_train": {"gamma": 0.0}},
            "student_train.gamma: the lr factor at each milestone must lie in (0, 1]",
        ),
        (
            {"teacher_train": {"teachers": {"t": {"arch": "x", "milestones": [1.0]}}}},
            "teacher_train.teachers.t.milestones: must be increasing fractions",
        ),
        (  # an entry of a named mapping is named in its own errors
            {"ensemble": {"ensembles": {"pair": {"teachers": ["a"]}}}},
            "ensemble.ensembles.pair.teachers: an ensemble combines at least two teachers",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "loss": "dist"}}}},
            "student_train.experiments.a.loss: must be one of ['kd', 'dkd', 'ls', 'ttm'], got 'dist'",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "loss": "dkd", "adjust": "lsr"}}}},
            "student_train.experiments.a.loss: dkd is undefined on the fixed-target rows of adjust: lsr",
        ),
        (
            {"student_train": {"experiments": {"a": {"kd": False, "loss": "ttm"}}}},
            "student_train.experiments.a.loss: ttm distils a teacher, but kd is false",
        ),
        (
            {
                "student_train": {
                    "experiments": {
                        "a": {"teacher": "t", "loss": "ttm", "adjust": "lsr", "fixed_target_temperature": 2}
                    }
                }
            },
            "student_train.experiments.a.fixed_target_temperature: ttm never softens the student",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "dkd_beta": 4.0}}}},
            "student_train.experiments.a.dkd_beta: only read with loss: dkd (this experiment has loss: kd)",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "loss": "dkd", "dkd_alpha": -1}}}},
            "student_train.experiments.a.dkd_alpha: must be a finite number >= 0, got -1",
        ),
        (
            {
                "student_train": {
                    "experiments": {"a": {"teacher": "t", "loss": "dkd", "dkd_beta": float("nan")}}
                }
            },
            "student_train.experiments.a.dkd_beta: must be a finite number, got nan",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "dkd_warmup": 20}}}},
            "student_train.experiments.a.dkd_warmup: only read with loss: dkd (this experiment has loss: kd)",
        ),
        (
            {"student_train": {"experiments": {"a": {"kd": False, "dkd_warmup": 2}}}},
            "student_train.experiments.a.dkd_warmup: only read with loss: dkd (this experiment has kd: "
            "false, a cross-entropy student); remove it",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "loss": "dkd", "dkd_warmup": None}}}},
            "student_train.experiments.a.dkd_warmup: must be an integer, got null",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "loss": "dkd", "dkd_warmup": -1}}}},
            "student_train.experiments.a.dkd_warmup: must be a number of epochs >= 0, got -1",
        ),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "loss": "dkd", "dkd_warmup": 2.5}}}},
            "student_train.experiments.a.dkd_warmup",
        ),
    ],
)
def test_bad_params_raise_one_error_naming_the_section_and_key(raw, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Params, raw, "")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bare_off_read_as_false_by_yaml_means_the_string_off(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("student_train:\n  experiments:\n    a: {teacher: t, dtd: off}\n")
    assert load_params(path).student_train.experiments["a"].dtd == "off"


def test_experiment_fields_fall_back_to_shared_defaults_and_override_them():
    params = from_dict(
        Params,
        {
            "student_train": {
                "lr": 0.1,
                "experiments": {"a": {"teacher": "t"}, "b": {"teacher": "t", "lr": 0.01}},
                "seeds": [4, 5],
            }
        },
        "",
    )
    assert params.student_train.experiment("a").lr == 0.1
    assert params.student_train.experiment("a").seed == 4
    assert (params.student_train.experiment("b", 5).lr, params.student_train.experiment("b", 5).seed) == (
        0.01,
        5,
    )
    with pytest.raises(ConfigError, match="no experiment named 'c'"):
        params.student_train.experiment("c")


def test_the_student_lr_schedule_is_shared_by_every_experiment():
    params = from_dict(
        Params,
        {
            "student_train": {
                "schedule": "step",
                "milestones": [0.6, 0.9],
                "gamma": 0.2,
                "experiments": {"a": {"teacher": "t"}},
            }
        },
        "",
    )
    a = params.student_train.experiment("a")
    assert (a.schedule, a.milestones, a.gamma) == ("step", (0.6, 0.9), 0.2)
    default = from_dict(Params, {"student_train": {"experiments": {"a": {"teacher": "t"}}}}, "")
    assert default.student_train.experiment("a").schedule == "cosine"


def test_kd_without_a_teacher_and_ce_with_adjustment_are_refused():
    params = from_dict(
        Params,
        {"student_train": {"experiments": {"a": {"kd": True}, "b": {"kd": False, "adjust": "ps"}}}},
        "",
    )
    with pytest.raises(ConfigError, match="teacher: required when kd is true"):
        params.student_train.experiment("a")
    with pytest.raises(ConfigError, match="adjust/dtd/teacher_mode need kd: true"):
        params.student_train.experiment("b")


def test_a_key_given_twice_is_refused_instead_of_the_last_one_winning(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("student_train:\n  epochs: 3\n  lr: 0.1\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"key 'epochs' is given twice \(line 4\); keep one"):
        load_params(path)


def test_a_missing_or_broken_params_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the parameters file"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_dotted_overrides_apply_after_reading(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  name: npz\n")
    params = load_params(path, overrides={"data.max_train_samples": 50, "teacher_dump.dtype": "float32"})
    assert params.data.max_train_samples == 50 and params.teacher_dump == TeacherDumpConfig(dtype="float32")


def test_every_parameter_dvc_yaml_names_is_set_in_params_yaml():
    # dvc refuses to run a stage whose listed parameter is missing from params.yaml, even when
    # pipeline/sections.py has a default for it: a key added to dvc.yaml must be added here too.
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = {
        "${key}": list(params["teacher_train"]["teachers"]),
        "${item.experiment}": list(params["student_train"]["experiments"]),
    }
    checked = 0
    for stage_name, stage in stages.items():
        for entry in stage.get("do", stage).get("params", []):
            paths = [entry]
            for placeholder, values in names.items():
                paths = [
                    p.replace(placeholder, v) for p in paths for v in (values if placeholder in p else [""])
                ]
            for path in paths:
                node = params
                for part in path.split("."):
                    assert isinstance(node, dict) and part in node, (
                        f"dvc.yaml stage {stage_name} lists {path!r}, which params.yaml does not set"
                    )
                    node = node[part]
                checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    "student, message",
    [
        (
            {"experiments": {"a": {"teacher": "nobody"}}},
            "student_train.experiments.a.teacher: "
            "no teacher named 'nobody' in teacher_train.teachers (known: t)",
        ),
        (
            {"experiments": {"a": {"teacher": "t", "adjust": "lsr"}}},
            "student_train.experiments.a.adjust: 'lsr' is not in adjust.methods ['ps']; add it there",
        ),
        (
            {"experiments": {"a": {"teacher": "t", "arch": "resnet2O"}}},
            "student_train.experiments.a: unknown architecture 'resnet2O'",
        ),
    ],
)
def test_check_pipeline_finds_what_no_single_section_can(student, message):
    params = from_dict(
        Params,
        {
            "teacher_train": {"teachers": {"t": {"arch": "mlp"}}},
            "adjust": {"methods": ["ps"]},
            "student_train": student,
        },
        "",
    )
    with pytest.raises(ConfigError) as info:
        params.check_pipeline(known_archs=["mlp", "resnet20"])
    assert message in str(info.value)


def test_check_pipeline_accepts_the_shipped_params_and_names_the_experiments():
    import nets

    names = load_params(ROOT / "params.yaml").check_pipeline(nets.available_nets())
    assert names == ["ce", "kd", "kd_ps", "kd_lsr", "kd_flsw", "kd_ps_flsw"]


@pytest.mark.parametrize("alpha", [-0.1, 1.1, float("nan")])
def test_an_alpha_outside_zero_one_is_refused_on_load_since_the_kd_loss_checks_nothing(alpha):
    for raw, key in (
        ({"student_train": {"alpha": alpha}}, "student_train.alpha"),
        (
            {"student_train": {"experiments": {"a": {"teacher": "t", "alpha": alpha}}}},
            "student_train.experiments.a.alpha",
        ),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict(Params, raw, "")


def test_the_loss_defaults_to_kd_and_each_family_member_resolves_with_its_keys():
    params = from_dict(
        Params,
        {
            "student_train": {
                "experiments": {
                    "kd": {"teacher": "t"},
                    "dkd": {"teacher": "t", "loss": "dkd", "adjust": "ps", "dtd": "flsw", "dkd_beta": 2},
                    "ls_lsr": {"teacher": "t", "loss": "ls", "adjust": "lsr"},
                    "ttm_lsr": {"teacher": "t", "loss": "ttm", "adjust": "lsr", "dtd": "static"},
                }
            }
        },
        "",
    )
    resolved = {name: params.student_train.experiment(name) for name in ("kd", "dkd", "ls_lsr", "ttm_lsr")}
    assert (resolved["kd"].loss, resolved["kd"].dkd_alpha, resolved["kd"].dkd_beta) == ("kd", 1.0, 8.0)
    assert (resolved["dkd"].loss, resolved["dkd"].dkd_alpha, resolved["dkd"].dkd_beta) == ("dkd", 1.0, 2.0)
    assert (resolved["kd"].dkd_warmup, resolved["dkd"].dkd_warmup) == (0, 0)  # no warm-up by default
    # ls and ttm take KA-LSR: its fixed rows are matched with the plain student, weight 1
    assert resolved["ls_lsr"].fixed_target_temperature == resolved["ttm_lsr"].fixed_target_temperature == 1.0
