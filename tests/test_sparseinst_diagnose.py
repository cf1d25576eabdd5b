"""dev/diagnose/sparseinst_diagnose.py on a freshly initialised shapes model (real checkpoint file,
real shapes data): the location prior + location matching put a matched map on its object
from the first step, the reference decoder does not; the probe reports held-out accuracy."""
import argparse
import os
import re

import torch

import d2seg  # noqa: F401
from d2seg.engine import Trainer, setup_cfg

from conftest import REPO, load_script
CONFIG = os.path.join(REPO, "configs/SparseInst/sparse_inst_r18_giam_shapes.yaml")
LOC = ["MODEL.SPARSE_INST.DECODER.IAM_LOCATION_PRIOR", "0.1", "MODEL.SPARSE_INST.MATCHER.LOCATION_SIGMA", "0.1"]


tool = load_script("dev/diagnose/sparseinst_diagnose.py")


def run(capsys, mode, ckpt, images, opts=(), oracle=False, config=CONFIG, dataset="shapes_val"):
    args = argparse.Namespace(config=config, checkpoint=ckpt, opts=list(opts), oracle=oracle, feature="p3",
                              dataset=dataset, images=images)
    capsys.readouterr()
    (tool.maps if mode == "maps" else tool.features)(args)
    return capsys.readouterr().out


def mass_and_area(stdout):
    m = re.search(r"mass inside its matched object ([\d.]+) % \(objects' mean area ([\d.]+) %\)", stdout)
    return float(m.group(1)), float(m.group(2))


def test_maps_and_probe_on_an_initialised_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = Trainer.build_model(setup_cfg(CONFIG, ["MODEL.DEVICE", "cpu"]))
    ckpt = str(tmp_path / "init.pth")
    torch.save({"model": model.state_dict()}, ckpt)

    ref = run(capsys, "maps", ckpt, 8)
    loc = run(capsys, "maps", ckpt, 8, LOC)
    ref_mass, area = mass_and_area(ref)
    loc_mass, _ = mass_and_area(loc)
    assert 1.0 < area < 15.0
    # reference decoder at initialisation: near-uniform maps, mass ~ the object's area;
    # with the prior and location matching the matched map sits on its object
    assert ref_mass < 2 * area and loc_mass > 3 * area, (ref, loc)
    corr = [float(re.search(r"correlation\s+([\d.]+)", s).group(1)) for s in (ref, loc)]
    assert corr[1] < corr[0]

    probe = run(capsys, "probe", ckpt, 30, oracle=True)
    m = re.search(r"(\d+) objects.*\n.*held out (\d+) %, fitted (\d+) %", probe)
    assert m and int(m.group(1)) >= 30, probe
