"""Class counts follow the training data (d2seg.engine.classes), and checkpoints with another
class count fine-tune: every shapes config loads an 80-class checkpoint of itself, keeps
everything but the class-dependent layers, and trains."""
import glob
import logging
import os

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.events import EventStorage

from conftest import CONFIGS, tiny_opts

FCOS = os.path.join(CONFIGS, "FCOS", "fcos_R18_shapes.yaml")
COCO_FCOS = os.path.join(CONFIGS, "FCOS", "R_50_1x.yaml")
SHAPES_CONFIGS = sorted(
    os.path.relpath(p, CONFIGS)
    for p in glob.glob(os.path.join(CONFIGS, "**", "*shapes*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


@pytest.fixture
def three_class_dataset():
    name = "test_three_classes_train"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"], evaluator_type="coco")
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_default_class_count_follows_the_data(three_class_dataset, caplog):
    from d2seg.engine import setup_cfg

    # a COCO config (80 classes by default) on 3-class data: every class key becomes 3
    with caplog.at_level(logging.INFO, logger="d2seg.engine.classes"):
        cfg = setup_cfg(COCO_FCOS, ["DATASETS.TRAIN", f"('{three_class_dataset}',)"])
    assert cfg.MODEL.FCOS.NUM_CLASSES == 3 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    (line,) = [r.getMessage() for r in caplog.records if "Class counts follow" in r.getMessage()]
    # the config's own key by name, the other methods' keys (set too) counted
    assert line == ("Class counts follow the training data: 3 thing_classes in test_three_classes_train; set "
                    "MODEL.FCOS.NUM_CLASSES (80) (not set by the config) to 3 (and 5 class key(s) of other methods)")
    # the shapes configs set 5 = their data: unchanged
    assert setup_cfg(FCOS).MODEL.FCOS.NUM_CLASSES == 5
    # without the data's metadata (not registered) nothing changes
    cfg = setup_cfg(COCO_FCOS, ["DATASETS.TRAIN", "('not_registered_anywhere',)"])
    assert cfg.MODEL.FCOS.NUM_CLASSES == 80


def test_conflicting_class_count_names_key_and_both_numbers(three_class_dataset):
    from d2seg.engine import setup_cfg

    with pytest.raises(ValueError, match=r"MODEL\.FCOS\.NUM_CLASSES is 5 in the config, but the training "
                                         r"data \(test_three_classes_train\) has 3 thing_classes"):
        setup_cfg(FCOS, ["DATASETS.TRAIN", f"('{three_class_dataset}',)"])
    # semantic: stuff_classes
    with pytest.raises(ValueError, match=r"MODEL\.SEM_SEG_HEAD\.NUM_CLASSES is 4 .* 6 stuff_classes"):
        setup_cfg(os.path.join(CONFIGS, "quick", "semantic_fpn_shapes.yaml"),
                  ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4"])


def test_every_config_agrees_with_its_data():
    from d2seg.engine import setup_cfg

    for path in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True):
        setup_cfg(path)  # raises on a conflict


def _class_keys_to(cfg, n):
    from d2seg.engine.classes import CLASS_KEYS

    cfg.defrost()
    cfg.merge_from_list([x for key, _ in CLASS_KEYS for x in (key, n)])
    cfg.freeze()
    return cfg


@pytest.mark.parametrize("config", SHAPES_CONFIGS)
def test_80_class_checkpoint_fine_tunes_on_shapes(config, tmp_path, caplog):
    from d2seg.engine import AtomicCheckpointer, Trainer, setup_cfg

    path = os.path.join(CONFIGS, config)
    big = _class_keys_to(setup_cfg(path, tiny_opts(tmp_path), follow_dataset_classes=False), 80)
    torch.manual_seed(1)
    source = Trainer.build_model(big).state_dict()
    ckpt = tmp_path / "coco80.pth"
    torch.save({"model": source}, ckpt)

    cfg = setup_cfg(path, tiny_opts(tmp_path))
    torch.manual_seed(2)
    model = Trainer.build_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        AtomicCheckpointer(model).load(str(ckpt))
    loaded = model.state_dict()
    differ = sorted(k for k in loaded if source[k].shape != loaded[k].shape)
    assert differ, "the 80-class checkpoint should differ in the class-dependent layers"
    for k, v in loaded.items():
        if k in differ:
            assert torch.equal(v, fresh[k]), f"{k}: not the model's initialisation"
        else:
            assert torch.equal(v, source[k]), f"{k}: not loaded from the checkpoint"
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "class-dependent layers" in log and all(k in log for k in differ), log[-3000:]

    # and it trains
    batch = next(iter(Trainer.build_train_loader(cfg)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    with EventStorage(0):
        for _ in range(2):
            losses = model(batch)
            total = sum(losses.values())
            assert torch.isfinite(total)
            opt.zero_grad()
            total.backward()
            opt.step()


def test_registered_coco_json_sets_the_class_count(tmp_path):
    import json

    from d2seg.data import register_coco_dataset
    from d2seg.engine import setup_cfg

    ann = {"images": [], "annotations": [],
           "categories": [{"id": 1, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (tmp_path / "train.json").write_text(json.dumps(ann))
    register_coco_dataset("test_two_classes_train", str(tmp_path / "train.json"), str(tmp_path))
    try:
        cfg = setup_cfg(COCO_FCOS, ["DATASETS.TRAIN", "('test_two_classes_train',)"])
        assert cfg.MODEL.FCOS.NUM_CLASSES == 2
    finally:
        DatasetCatalog.remove("test_two_classes_train")
        MetadataCatalog.remove("test_two_classes_train")


BLENDMASK_COCO = os.path.join(CONFIGS, "BlendMask", "R_50_1x.yaml")


@pytest.fixture
def coco_file_dataset(tmp_path):
    """register(name, n): a COCO file with n categories (ids 1..n, no images) registered
    under ``name``; removed after the test."""
    import json

    from d2seg.data import register_coco_dataset

    names = []

    def register(name, n):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"images": [], "annotations": [],
                                    "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(n)]}))
        register_coco_dataset(name, str(path), str(tmp_path))
        names.append(name)
        return path

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("n", [1, 3, 90])
def test_blendmask_basis_module_classes_follow_the_data(coco_file_dataset, n):
    """BlendMask's auxiliary semantic head (MODEL.BASIS_MODULE.NUM_CLASSES, loss on in
    Base-BlendMask.yaml) follows the data like the detector's class key: with fewer classes
    it used to keep an 80-class head, with more its labels went out of range."""
    from d2seg.engine import setup_cfg

    coco_file_dataset(f"test_{n}_classes_train", n)
    cfg = setup_cfg(BLENDMASK_COCO, ["DATASETS.TRAIN", f"('test_{n}_classes_train',)"])
    assert cfg.MODEL.BASIS_MODULE.LOSS_ON
    assert cfg.MODEL.BASIS_MODULE.NUM_CLASSES == n and cfg.MODEL.FCOS.NUM_CLASSES == n


def test_every_class_count_key_follows_the_data():
    """Every NUM_CLASSES key of the config is one that follows the data (a new method's key
    missing from CLASS_KEYS fails here), except Detectron2's federated-loss sample size."""
    from d2seg.config import get_d2seg_cfg
    from d2seg.engine.classes import CLASS_KEYS

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif k.endswith("NUM_CLASSES"):
                yield prefix + k

    keys = set(walk(get_d2seg_cfg())) - {"MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES"}
    assert keys == {key for key, _ in CLASS_KEYS}


def test_explicit_default_class_count_is_kept(three_class_dataset, tmp_path):
    """A key set to its default on purpose (80 on the command line or in a config file) is
    a request for 80 classes: on 3-class data it is an error, not silently rewritten."""
    from d2seg.engine import setup_cfg

    data = ["DATASETS.TRAIN", f"('{three_class_dataset}',)"]
    with pytest.raises(ValueError, match=r"MODEL\.FCOS\.NUM_CLASSES is 80 in the config, but the training "
                                         r"data \(test_three_classes_train\) has 3"):
        setup_cfg(COCO_FCOS, data + ["MODEL.FCOS.NUM_CLASSES", "80"])
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"_BASE_: {COCO_FCOS}\nMODEL:\n  FCOS:\n    NUM_CLASSES: 80\n")
    with pytest.raises(ValueError, match=r"MODEL\.FCOS\.NUM_CLASSES is 80"):
        setup_cfg(str(mine), data)
    # the same config without the key follows the data
    assert setup_cfg(COCO_FCOS, data).MODEL.FCOS.NUM_CLASSES == 3


def test_conflict_error_gives_the_whole_override(three_class_dataset):
    """BlendMask's shapes config sets two class keys: the error names both and the one
    command-line override that makes the config fit the data, which then works."""
    from d2seg.engine import setup_cfg

    config = os.path.join(CONFIGS, "BlendMask", "blendmask_R18_shapes.yaml")
    data = ["DATASETS.TRAIN", f"('{three_class_dataset}',)"]
    with pytest.raises(ValueError) as e:
        setup_cfg(config, data)
    message = str(e.value)
    assert "MODEL.BASIS_MODULE.NUM_CLASSES is 5 in the config" in message
    override = message.split("add '")[1].split("'")[0].split()
    assert override == ["MODEL.FCOS.NUM_CLASSES", "3", "MODEL.BASIS_MODULE.NUM_CLASSES", "3"]
    cfg = setup_cfg(config, data + override)
    assert cfg.MODEL.FCOS.NUM_CLASSES == 3 and cfg.MODEL.BASIS_MODULE.NUM_CLASSES == 3


def test_coco_json_is_read_once_per_version(coco_file_dataset, monkeypatch):
    """setup_cfg does not parse the whole COCO file on every call: once per version of the
    file (a changed file is read again)."""
    import json

    reads = []
    real_load = json.load

    def counting_load(f, *args, **kwargs):
        reads.append(getattr(f, "name", None))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(json, "load", counting_load)
    from d2seg.engine import setup_cfg

    path = coco_file_dataset("test_cached_train", 4)
    data = ["DATASETS.TRAIN", "('test_cached_train',)"]
    for _ in range(3):
        assert setup_cfg(COCO_FCOS, data).MODEL.FCOS.NUM_CLASSES == 4
    assert reads.count(str(path)) == 1
    path.write_text(json.dumps({"images": [], "annotations": [],
                                "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(6)]}))
    assert setup_cfg(COCO_FCOS, data).MODEL.FCOS.NUM_CLASSES == 6
    assert reads.count(str(path)) == 2
