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
    assert any("MODEL.FCOS.NUM_CLASSES (80)" in r.getMessage() and "3 thing_classes" in r.getMessage()
               for r in caplog.records)
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
