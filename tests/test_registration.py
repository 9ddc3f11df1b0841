"""Adding a component is one decorated class in the user's code: each kind registered here, from
the test file, is then named in a config and used through the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from strongreid.cli import main
from strongreid.config import load_config
from strongreid.config.loader import dump_config
from strongreid.data.datasets import DATASETS, ImageRecord, ReIDDataset
from strongreid.deploy.export import EXPORT_FORMATS, ExportJob
from strongreid.errors import ConfigError
from strongreid.losses import ID_LOSSES, PAIR_LOSSES, build_loss
from strongreid.modeling import BACKBONES, HEADS, build_model
from strongreid.modeling.outputs import ModelOutput

SRC = Path(__file__).resolve().parents[1] / "src"
CPU = ["MODEL.DEVICE", "cpu", "MODEL.PRETRAIN_CHOICE", "none"]


@pytest.fixture
def registered():
    """Registers entries for one test and removes them afterwards."""
    added: list[tuple[object, str]] = []

    def register(registry, name, obj):
        registry.register(name)(obj)
        added.append((registry, name))
        return obj

    yield register
    for registry, name in added:
        registry._items.pop(name)


class TinyNet(nn.Module):
    """A 2-conv backbone: B x 3 x H x W -> B x 8 x H/4 x W/4."""

    feat_dim = 8

    def __init__(self, last_stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, last_stride, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_backbone(registered, capsys):
    register = registered
    register(BACKBONES, "tiny_net", TinyNet)
    assert main(["config", "MODEL.NAME", "tiny_net", *CPU]) == 0
    assert "NAME: tiny_net" in capsys.readouterr().out
    model = build_model(load_config(None, ["MODEL.NAME", "tiny_net", *CPU]), 4)
    assert isinstance(model.backbone, TinyNet) and model.feat_dim == 8
    assert main(["config", "MODEL.NAME", "tiny_nett", *CPU]) == 2
    assert "Did you mean tiny_net" in capsys.readouterr().err


def test_head_with_its_own_check(registered, capsys):
    class MeanHead(nn.Module):
        """Mean of the map, a bias classifier; refuses MODEL.NECK 'no'."""

        @classmethod
        def check(cls, cfg) -> None:
            if cfg.MODEL.NECK == "no":
                raise ConfigError("MODEL.HEAD 'mean' needs MODEL.NECK 'bnneck'")

        @classmethod
        def from_config(cls, cfg, backbone, num_classes):
            return cls(backbone, num_classes)

        def __init__(self, backbone, num_classes):
            super().__init__()
            self.backbone, self.classifier = backbone, nn.Linear(backbone.feat_dim, num_classes)
            self.feat_dim, self.num_classes, self.arch = backbone.feat_dim, num_classes, "mean"

        def forward(self, x):
            f = self.backbone(x).mean((2, 3))
            return (self.classifier(f), f) if self.training else f

    registered(HEADS, "mean", MeanHead)
    opts = ["MODEL.HEAD", "mean", "MODEL.NAME", "resnet18", *CPU]
    assert main(["config", *opts]) == 0
    assert "HEAD: mean" in capsys.readouterr().out
    model = build_model(load_config(None, opts), 3).eval()
    assert isinstance(model, MeanHead) and model(torch.randn(1, 3, 64, 32)).shape == (1, 512)
    assert main(["config", *opts, "MODEL.NECK", "no"]) == 2
    assert "needs MODEL.NECK 'bnneck'" in capsys.readouterr().err


def test_id_loss_and_pair_term(registered, capsys):
    class HalfCE(nn.Module):
        @staticmethod
        def from_config(cfg, ce):
            return HalfCE(ce)

        def __init__(self, ce):
            super().__init__()
            self.ce = ce

        def forward(self, logits, targets):
            return 0.5 * self.ce(logits, targets)

    class MeanNorm(nn.Module):
        weight_key = "SOLVER.ID_LOSS_WEIGHT"  # any weight key of the tree

        @classmethod
        def from_config(cls, cfg):
            return cls()

        def forward(self, feats, labels):
            return feats.norm(dim=1).mean()

    registered(ID_LOSSES, "half_ce", HalfCE)
    registered(PAIR_LOSSES, "mean_norm", MeanNorm)
    opts = ["MODEL.ID_LOSS_TYPE", "half_ce", "MODEL.METRIC_LOSS_TYPE", "triplet,mean_norm",
            "DATALOADER.SAMPLER", "softmax_triplet", "MODEL.IF_LABELSMOOTH", "off", *CPU]
    assert main(["config", *opts]) == 0
    assert "METRIC_LOSS_TYPE: triplet,mean_norm" in capsys.readouterr().out
    loss = build_loss(load_config(None, opts), 3, 4)
    feats = torch.tensor([[3.0, 4.0, 0.0, 0.0]] * 4)
    terms = loss(ModelOutput(torch.zeros(4, 3), feats), torch.tensor([0, 0, 1, 1]))
    assert terms["mean_norm"].item() == pytest.approx(5.0)
    assert terms["id"].item() == pytest.approx(0.5 * torch.log(torch.tensor(3.0)).item(), rel=1e-5)
    assert main(["config", "MODEL.METRIC_LOSS_TYPE", "mean_nrm", "DATALOADER.SAMPLER", "triplet", *CPU]) == 2
    assert "unknown term 'mean_nrm'" in capsys.readouterr().err


def test_dataset(registered, tmp_path, capsys):
    class OneFolder(ReIDDataset):
        TITLE = "one folder"

        def load(self):
            rec = [ImageRecord(str(tmp_path / f"{i}.jpg"), i % 2, i % 2) for i in range(4)]
            return rec, rec[:2], rec[2:]

    registered(DATASETS, "one_folder", OneFolder)
    assert main(["datasets", "list"]) == 0
    assert "one_folder" in capsys.readouterr().out.split()
    assert main(["config", "DATASETS.NAMES", "one_folder", *CPU]) == 0
    assert main(["config", "DATASETS.NAMES", "one_foldr", *CPU]) == 2
    assert "Did you mean one_folder" in capsys.readouterr().err


def test_export_format(registered, tmp_path, capsys):
    class StateDictFormat:
        """The inference model's state dict, read back into the same graph."""

        suffixes = (".sd",)

        def write(self, job: ExportJob):
            torch.save(job.model.state_dict(), job.out)
            job.model.load_state_dict(torch.load(job.out, weights_only=True))
            return lambda x: job.graph(x).detach().numpy()

    registered(EXPORT_FORMATS, "state_dict", StateDictFormat)
    opts = ["MODEL.NAME", "resnet18", "INPUT.SIZE_TEST", "[32, 16]", *CPU]
    cfg = load_config(None, opts)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": build_model(cfg, 5).state_dict(), "num_classes": 5, "arch": "resnet18",
                "config": dump_config(cfg)}, ckpt)
    assert main(["export", *opts, "TEST.WEIGHT", str(ckpt), "--out", str(tmp_path / "m.sd")]) == 0
    assert "exported resnet18 (state_dict)" in capsys.readouterr().out
    assert (tmp_path / "m.sd").is_file()


def test_a_component_may_own_new_keys():
    # In a fresh process, so the added key does not reach the other tests' config tree.
    code = textwrap.dedent("""
        import torch.nn as nn
        from strongreid.cli import main
        from strongreid.config.components import add_defaults, config_check
        from strongreid.errors import ConfigError
        from strongreid.modeling import HEADS

        add_defaults({"MODEL.WIDE_WIDTH": 16}, "wide head")

        @config_check("wide head")
        def check(cfg):
            if cfg.MODEL.WIDE_WIDTH < 1:
                raise ConfigError(f"MODEL.WIDE_WIDTH = {cfg.MODEL.WIDE_WIDTH} must be at least 1")

        raise SystemExit(main(["config", "MODEL.WIDE_WIDTH", *__import__("sys").argv[1:]]))
    """)
    ok = subprocess.run([sys.executable, "-c", code, "32"], capture_output=True, text=True,
                        env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert ok.returncode == 0, ok.stderr
    assert "WIDE_WIDTH: 32" in ok.stdout
    bad = subprocess.run([sys.executable, "-c", code, "0"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC), "PATH": ""})
    assert bad.returncode == 2 and "MODEL.WIDE_WIDTH = 0 must be at least 1" in bad.stderr
