"""Config loading: upstream compatibility, coercion, validation, the `config` command."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from strongreid.cli import main
from strongreid.config import dataset_names, flag, get_cfg_defaults, load_config
from strongreid.config.loader import DEAD_KEYS, config_from_text, dump_config
from strongreid.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Every key of reid-strong-baseline's config/defaults.py with its default.
UPSTREAM_DEFAULTS = {
    "MODEL.DEVICE": "cuda", "MODEL.DEVICE_ID": "0", "MODEL.NAME": "resnet50", "MODEL.LAST_STRIDE": 1,
    "MODEL.PRETRAIN_PATH": "", "MODEL.PRETRAIN_CHOICE": "imagenet", "MODEL.NECK": "bnneck",
    "MODEL.IF_WITH_CENTER": "no", "MODEL.METRIC_LOSS_TYPE": "triplet", "MODEL.IF_LABELSMOOTH": "on",
    "INPUT.SIZE_TRAIN": [384, 128], "INPUT.SIZE_TEST": [384, 128], "INPUT.PROB": 0.5,
    "INPUT.RE_PROB": 0.5, "INPUT.PIXEL_MEAN": [0.485, 0.456, 0.406],
    "INPUT.PIXEL_STD": [0.229, 0.224, 0.225], "INPUT.PADDING": 10,
    "DATASETS.NAMES": "market1501", "DATASETS.ROOT_DIR": "./data",
    "DATALOADER.NUM_WORKERS": 8, "DATALOADER.SAMPLER": "softmax", "DATALOADER.NUM_INSTANCE": 16,
    "SOLVER.OPTIMIZER_NAME": "Adam", "SOLVER.MAX_EPOCHS": 50, "SOLVER.BASE_LR": 3e-4,
    "SOLVER.BIAS_LR_FACTOR": 2, "SOLVER.MOMENTUM": 0.9, "SOLVER.MARGIN": 0.3,
    "SOLVER.CLUSTER_MARGIN": 0.3, "SOLVER.CENTER_LR": 0.5, "SOLVER.CENTER_LOSS_WEIGHT": 0.0005,
    "SOLVER.RANGE_K": 2, "SOLVER.RANGE_MARGIN": 0.3, "SOLVER.RANGE_ALPHA": 0, "SOLVER.RANGE_BETA": 1,
    "SOLVER.RANGE_LOSS_WEIGHT": 1, "SOLVER.WEIGHT_DECAY": 0.0005, "SOLVER.WEIGHT_DECAY_BIAS": 0.0,
    "SOLVER.GAMMA": 0.1, "SOLVER.STEPS": (30, 55), "SOLVER.WARMUP_FACTOR": 1.0 / 3,
    "SOLVER.WARMUP_ITERS": 500, "SOLVER.WARMUP_METHOD": "linear", "SOLVER.CHECKPOINT_PERIOD": 50,
    "SOLVER.LOG_PERIOD": 100, "SOLVER.EVAL_PERIOD": 50, "SOLVER.IMS_PER_BATCH": 64,
    "TEST.IMS_PER_BATCH": 128, "TEST.RE_RANKING": "no", "TEST.WEIGHT": "", "TEST.NECK_FEAT": "after",
    "TEST.FEAT_NORM": "yes", "OUTPUT_DIR": "",
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_every_upstream_key_has_its_default():
    cfg = get_cfg_defaults()
    for key, value in UPSTREAM_DEFAULTS.items():
        got = _get(cfg, key)
        if isinstance(value, float):
            assert got == pytest.approx(value), key
        else:
            assert got == value, key


@pytest.mark.parametrize(
    "name, expected",
    [
        ("baseline.yml", {"MODEL.LAST_STRIDE": 2, "MODEL.NECK": "no", "INPUT.RE_PROB": 0.0,
                          "MODEL.IF_LABELSMOOTH": "off", "SOLVER.WARMUP_ITERS": 0,
                          "SOLVER.STEPS": (40, 70), "DATALOADER.NUM_INSTANCE": 4}),
        ("softmax.yml", {"DATALOADER.SAMPLER": "softmax", "SOLVER.WARMUP_ITERS": 5,
                         "SOLVER.STEPS": (30, 55), "SOLVER.EVAL_PERIOD": 20}),
        ("softmax_triplet.yml", {"MODEL.METRIC_LOSS_TYPE": "triplet", "MODEL.IF_WITH_CENTER": "no",
                                 "SOLVER.WARMUP_ITERS": 10, "SOLVER.WARMUP_FACTOR": 0.01}),
        ("softmax_triplet_with_center.yml", {"MODEL.METRIC_LOSS_TYPE": "triplet_center",
                                             "MODEL.IF_WITH_CENTER": "yes",
                                             "SOLVER.CENTER_LR": 0.5, "SOLVER.MAX_EPOCHS": 120}),
    ],
)
def test_original_configs_load_with_their_values(name, expected):
    cfg = load_config(str(CONFIGS / name))
    for key, value in expected.items():
        assert _get(cfg, key) == value, key
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.00035)
    assert cfg.INPUT.SIZE_TRAIN == [256, 128]
    assert dataset_names(cfg) == ["market1501"]


UPSTREAM_YML = """\
MODEL:
  PRETRAIN_CHOICE: 'imagenet'
  PRETRAIN_PATH: '/home/haoluo/.torch/models/resnet50-19c8e357.pth'
  METRIC_LOSS_TYPE: 'triplet_center'
  IF_LABELSMOOTH: 'on'
  IF_WITH_CENTER: 'yes'
INPUT:
  SIZE_TRAIN: [256, 128]
  SIZE_TEST: [256, 128]
DATASETS:
  NAMES: ('market1501')
DATALOADER:
  SAMPLER: 'softmax_triplet'
  NUM_INSTANCE: 4
SOLVER:
  CLUSTER_MARGIN: 0.3
  RANGE_K: 2
  RANGE_LOSS_WEIGHT: 1
  STEPS: [40, 70]
TEST:
  WEIGHT: "path"
OUTPUT_DIR: "/home/haoluo/log/gu/reid_baseline_review/Opensource_test/market1501/x"
"""


def test_upstream_yml_loads_unchanged_and_warns_once_about_dead_keys(tmp_path, caplog):
    path = tmp_path / "upstream.yml"
    path.write_text(UPSTREAM_YML)
    with caplog.at_level(logging.WARNING, logger="strongreid"):
        cfg = load_config(str(path))
    assert cfg.MODEL.IF_WITH_CENTER == "yes"
    assert cfg.SOLVER.STEPS == (40, 70)
    dead = [r for r in caplog.records if "unused" in r.getMessage()]
    assert len(dead) == 1
    assert "SOLVER.CLUSTER_MARGIN" in dead[0].getMessage()
    assert "SOLVER.RANGE_K" in dead[0].getMessage()


@pytest.mark.parametrize(
    "yaml_value, key, expected",
    [
        ("yes", "MODEL.IF_WITH_CENTER", "yes"),
        ("no", "TEST.RE_RANKING", "no"),
        ("on", "MODEL.IF_LABELSMOOTH", "on"),
        ("off", "MODEL.IF_LABELSMOOTH", "off"),
        ("true", "TEST.FEAT_NORM", "yes"),
        ("false", "TEST.FEAT_NORM", "no"),
        ("no", "MODEL.NECK", "no"),
    ],
)
def test_unquoted_yaml_booleans_are_the_original_flags(tmp_path, yaml_value, key, expected):
    section, leaf = key.split(".")
    extra = ""
    if key == "MODEL.IF_WITH_CENTER":
        extra = "  METRIC_LOSS_TYPE: center\n"
    path = tmp_path / "c.yml"
    path.write_text(f"{section}:\n  {leaf}: {yaml_value}\n{extra}")
    assert isinstance(yaml.safe_load(path.read_text())[section][leaf], bool)
    assert _get(load_config(str(path)), key) == expected


def test_command_line_overrides_are_literal_evaluated():
    cfg = load_config(None, ["DATASETS.NAMES", "('dukemtmc')", "SOLVER.MAX_EPOCHS", "7",
                             "SOLVER.STEPS", "[3, 5]", "SOLVER.MARGIN", "None", "TEST.RE_RANKING", "True"])
    assert dataset_names(cfg) == ["dukemtmc"]
    assert cfg.SOLVER.MAX_EPOCHS == 7
    assert cfg.SOLVER.STEPS == (3, 5)
    assert cfg.SOLVER.MARGIN is None
    assert cfg.TEST.RE_RANKING == "yes"


def test_several_datasets():
    cfg = load_config(None, ["DATASETS.NAMES", "market1501,dukemtmc"])
    assert dataset_names(cfg) == ["market1501", "dukemtmc"]
    cfg = load_config(None, ["DATASETS.NAMES", "['market1501', 'msmt17']"])
    assert dataset_names(cfg) == ["market1501", "msmt17"]


def test_unknown_key_names_it_and_the_closest():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["SOLVER.BASE_LRR", "0.1"])
    assert "SOLVER.BASE_LRR" in str(exc.value)
    assert "SOLVER.BASE_LR" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["MODEL.BASE_LR", "0.1"])
    assert "SOLVER.BASE_LR" in str(exc.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("SOLVER:\n  MAX_EPOCH: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    assert "SOLVER.MAX_EPOCH" in str(exc.value) and str(path) in str(exc.value)
    assert "SOLVER.MAX_EPOCHS" in str(exc.value)
    path.write_text("SOLVR:\n  MAX_EPOCHS: 3\n")
    with pytest.raises(ConfigError, match="SOLVR"):
        load_config(str(path))


def test_bad_enum_value_names_the_allowed_ones():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["TEST.NECK_FEAT", "middle"])
    assert "'after'" in str(exc.value) and "'before'" in str(exc.value)
    with pytest.raises(ConfigError, match="IF_WITH_CENTER"):
        load_config(None, ["MODEL.IF_WITH_CENTER", "maybe"])


@pytest.mark.parametrize(
    "opts, words",
    [
        (["MODEL.IF_WITH_CENTER", "yes", "MODEL.METRIC_LOSS_TYPE", "triplet"], ["triplet_center"]),
        (["MODEL.IF_WITH_CENTER", "yes", "MODEL.METRIC_LOSS_TYPE", "triplet_center",
          "DATALOADER.SAMPLER", "softmax"], ["softmax_triplet"]),
        (["DATALOADER.SAMPLER", "softmax_triplet", "DATALOADER.NUM_INSTANCE", "4",
          "SOLVER.IMS_PER_BATCH", "30"], ["IMS_PER_BATCH", "NUM_INSTANCE"]),
        (["DATALOADER.SAMPLER", "softmax_triplet", "MODEL.METRIC_LOSS_TYPE", "center"], ["IF_WITH_CENTER"]),
        (["SOLVER.STEPS", "[70, 40]"], ["STEPS"]),
        (["MODEL.PRETRAIN_CHOICE", "self"], ["PRETRAIN_PATH"]),
        (["INPUT.SIZE_TRAIN", "[256]"], ["SIZE_TRAIN"]),
        (["SOLVER.MAX_EPOCHS", "abc"], ["MAX_EPOCHS", "integer"]),
    ],
)
def test_impossible_combinations_get_one_clear_message(opts, words):
    with pytest.raises(ConfigError) as exc:
        load_config(None, opts)
    for w in words:
        assert w in str(exc.value)


def test_odd_number_of_overrides():
    with pytest.raises(ConfigError, match="pairs"):
        load_config(None, ["SOLVER.MAX_EPOCHS"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_dump_roundtrip():
    cfg = load_config(str(CONFIGS / "softmax_triplet_with_center.yml"), ["SOLVER.MARGIN", "None"])
    again = config_from_text(dump_config(cfg))
    assert again == cfg


def test_config_command_prints_merged_yaml(capsys):
    rc = main(["config", "--config", str(CONFIGS / "softmax_triplet.yml"), "SOLVER.MAX_EPOCHS", "3"])
    assert rc == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["SOLVER"]["MAX_EPOCHS"] == 3
    assert data["MODEL"]["METRIC_LOSS_TYPE"] == "triplet"


def test_config_command_error_is_one_line_without_traceback(capsys):
    rc = main(["config", "SOLVER.BASE_LRR", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: unknown config key 'SOLVER.BASE_LRR'")
    assert "Traceback" not in err


def test_dead_keys_are_in_the_defaults():
    cfg = get_cfg_defaults()
    for key in DEAD_KEYS:
        _get(cfg, key)


_flag_words = st.sampled_from(["yes", "no", "on", "off", "true", "false", "YES", "Off", "True"])


@given(_flag_words)
def test_flag_parser(word):
    assert flag(word) is (word.lower() in {"yes", "on", "true"})


@given(st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), min_size=1, max_size=4),
       st.sampled_from(["plain", "tuple", "csv", "list"]))
def test_dataset_names_parser(names, style):
    cfg = get_cfg_defaults()
    if style == "plain" and len(names) == 1:
        raw = names[0]
    elif style == "tuple" and len(names) == 1:
        raw = ast.literal_eval(f"('{names[0]}')")  # the original's "('market1501')" is a string
    elif style == "list":
        raw = list(names)
    else:
        raw = ",".join(names)
    cfg.DATASETS.NAMES = raw
    assert dataset_names(cfg) == names


def test_saved_config_reloads_without_dead_key_warnings(tmp_path, caplog):
    from strongreid.config import save_config

    cfg = load_config(str(CONFIGS / "softmax_triplet_with_center.yml"))
    save_config(cfg, tmp_path / "config.yaml")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="strongreid"):
        again = load_config(str(tmp_path / "config.yaml"))
    assert not [r for r in caplog.records if "unused" in r.getMessage()]
    assert again == cfg


def test_command_options_may_follow_the_overrides():
    from strongreid.cli import _pull_options, build_parser

    parser = build_parser()
    args = parser.parse_args(["extract", "--config", "c.yml", "TEST.WEIGHT", "w.pt", "--images", "imgs",
                              "--out=f.npz", "TEST.FLIP_AUG", "True"])
    _pull_options(args._parser, args)
    assert (args.images, args.out, args.config) == ("imgs", "f.npz", "c.yml")
    assert args.opts == ["TEST.WEIGHT", "w.pt", "TEST.FLIP_AUG", "True"]
    args = parser.parse_args(["train", "SOLVER.MAX_EPOCHS", "3", "--resume"])
    _pull_options(args._parser, args)
    assert args.resume is True and args.opts == ["SOLVER.MAX_EPOCHS", "3"]


def test_config_may_follow_the_overrides_in_every_command(capsys):
    from strongreid.cli import _pull_options, build_parser

    yml = str(CONFIGS / "softmax_triplet.yml")
    rc = main(["config", "SOLVER.MAX_EPOCHS", "3", "--config", yml])
    assert rc == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["SOLVER"]["MAX_EPOCHS"] == 3 and data["MODEL"]["METRIC_LOSS_TYPE"] == "triplet"
    parser = build_parser()
    # The order `strongreid search` itself suggests: index, --query, --config, overrides.
    args = parser.parse_args(["search", "idx", "--query", "imgs", "--config", "c.yml",
                              "TEST.WEIGHT", "w.pt"])
    _pull_options(args._parser, args)
    assert (args.index, args.query, args.config, args.opts) == ("idx", "imgs", "c.yml",
                                                                ["TEST.WEIGHT", "w.pt"])
    args = parser.parse_args(["test", "TEST.WEIGHT", "w.pt", "--config-file=c.yml"])
    _pull_options(args._parser, args)
    assert (args.config, args.opts) == ("c.yml", ["TEST.WEIGHT", "w.pt"])
    with pytest.raises(SystemExit) as exc:
        main(["config", "--config", yml, "SOLVER.MAX_EPOCHS", "3", "--config", "other.yml"])
    assert exc.value.code == 2
    assert "--config is given twice" in capsys.readouterr().err


def test_an_os_error_a_command_did_not_foresee_is_one_line(monkeypatch, capsys):
    import strongreid.cli as cli

    def refused(args):
        raise PermissionError(13, "Permission denied", "/srv/runs/x/results.json")

    monkeypatch.setattr(cli, "_cmd_config", refused)
    assert cli.main(["config"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: cannot use /srv/runs/x/results.json: Permission denied; check the "
                   "path, its permissions and the free space\n")


def test_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["export", "TEST.WEIGHT", "w.pt", "--format", "onnx"])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err


def test_an_os_error_without_a_path_and_a_closed_pipe(monkeypatch, capsys):
    import strongreid.cli as cli

    def full(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_cmd_config", full)
    assert cli.main(["config"]) == 2
    assert capsys.readouterr().err == "error: No space left on device\n"

    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_config", reader_left)
    assert cli.main(["config"]) == 0
    assert capsys.readouterr().err == ""


def test_a_section_given_a_value_is_named_as_a_section(tmp_path, capsys):
    bad = tmp_path / "bad.yml"
    bad.write_text("SOLVER:\n  MAX_EPOCHS: 3\nMODEL: 3\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == (
        f"error: MODEL is a section of keys (in {bad}), but it is given the value 3: write its "
        "keys indented under it, e.g. MODEL.DEVICE\n")
    # The keys of a section not indented under it leave the section empty (None).
    bad.write_text("MODEL:\nNAME: resnet18\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert "MODEL is a section of keys" in capsys.readouterr().err
