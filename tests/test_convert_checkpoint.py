"""Checkpoint conversion: every foreign layout d2seg converts, through the one front door
(d2seg.model_zoo.convert_state_dict) and the CLI tools/convert_checkpoint.py.

The source state dicts are written here from each project's module tree (names and
shapes as AdelaiDet's adet/modeling/*, hustvl/SparseInst and Detectron2's PointRend
create them), NOT derived from our models, so a renamed or missing module in ours fails
the test. Backbones are Detectron2's ResNet in every source project, so their keys come
from Detectron2's own build_resnet_backbone. Each test checks that every source key lands
on a model key (or is dropped for a stated reason), that nothing is missing, and that the
values arrive unchanged.
"""
import os
import subprocess
import sys

import pytest
import torch

import d2seg  # noqa: F401
from d2seg.config import get_d2seg_cfg
from d2seg.model_zoo import convert_state_dict, detect_format, get_config_file
from d2seg.model_zoo.converters import compare_with_model
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_of(path, *opts):
    cfg = get_d2seg_cfg()
    cfg.merge_from_file(get_config_file(path))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# ----------------------------------------------------------------------------- source layouts
class Keys(dict):
    """name -> shape, filled like a module tree would be."""

    def conv(self, name, cout, cin, k, bias=True):
        self[f"{name}.weight"] = (cout, cin, k, k)
        if bias:
            self[f"{name}.bias"] = (cout,)

    def norm(self, name, c, kind):
        self[f"{name}.weight"] = (c,)
        self[f"{name}.bias"] = (c,)
        if kind in ("BN", "SyncBN"):
            self[f"{name}.running_mean"] = (c,)
            self[f"{name}.running_var"] = (c,)
            self[f"{name}.num_batches_tracked"] = ()

    def conv_block(self, name, cin, cout, k, norm):
        """AdelaiDet's conv_with_kaiming_uniform: Sequential(conv[, norm], ReLU); the conv has
        a bias only without a norm."""
        self.conv(f"{name}.0", cout, cin, k, bias=not norm)
        if norm:
            self.norm(f"{name}.1", cout, norm)

    def tensors(self):
        g = torch.Generator().manual_seed(0)
        out = {}
        for k, s in self.items():
            out[k] = torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g)
        return out


def resnet_keys(cfg, prefix):
    """Detectron2's ResNet (AdelaiDet and hustvl use it as it is)."""
    bottom_up = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    return Keys({prefix + k: tuple(v.shape) for k, v in bottom_up.state_dict().items()})


def adelaidet_fcos_backbone(cfg):
    """AdelaiDet's build_fcos_resnet_fpn_backbone: FPN on res3-res5 + P6/P7 from P5 (256 ch),
    plus the pixel_mean/std buffers old Detectron2 (ProposalNetwork) saved."""
    keys = resnet_keys(cfg, "backbone.bottom_up.")
    c = cfg.MODEL.FPN.OUT_CHANNELS
    for lvl, cin in zip((3, 4, 5), (512, 1024, 2048)):
        keys.conv(f"backbone.fpn_lateral{lvl}", c, cin, 1)
        keys.conv(f"backbone.fpn_output{lvl}", c, c, 3)
    keys.conv("backbone.top_block.p6", c, c, 3)
    keys.conv("backbone.top_block.p7", c, c, 3)
    keys["pixel_mean"] = (3, 1, 1)
    keys["pixel_std"] = (3, 1, 1)
    return keys


def adelaidet_fcos_head(cfg, prefix="proposal_generator.fcos_head"):
    """AdelaiDet FCOSHead: {cls,bbox}_tower = [conv, GN, ReLU] x N, empty share_tower,
    cls_logits / bbox_pred / ctrness, scales.{l}.scale."""
    f = cfg.MODEL.FCOS
    c = cfg.MODEL.FPN.OUT_CHANNELS
    keys = Keys()
    for tower, n in (("cls", f.NUM_CLS_CONVS), ("bbox", f.NUM_BOX_CONVS)):
        for i in range(n):
            keys.conv(f"{prefix}.{tower}_tower.{3 * i}", c, c, 3)
            keys.norm(f"{prefix}.{tower}_tower.{3 * i + 1}", c, "GN")
    keys.conv(f"{prefix}.cls_logits", f.NUM_CLASSES, c, 3)
    keys.conv(f"{prefix}.bbox_pred", 4, c, 3)
    keys.conv(f"{prefix}.ctrness", 1, c, 3)
    if f.USE_SCALE:
        for lvl in range(len(f.IN_FEATURES)):
            keys[f"{prefix}.scales.{lvl}.scale"] = (1,)
    return keys


def adelaidet_condinst(cfg):
    """AdelaiDet CondInst: FCOS + top-level controller and mask_branch; mask_head holds only
    buffers: _iter and sizes_of_interest (in every released checkpoint)."""
    keys = adelaidet_fcos_backbone(cfg)
    keys.update(adelaidet_fcos_head(cfg))
    ci = cfg.MODEL.CONDINST
    mb, c = ci.MASK_BRANCH, cfg.MODEL.FPN.OUT_CHANNELS
    for i, _ in enumerate(mb.IN_FEATURES):
        keys.conv_block(f"mask_branch.refine.{i}", c, mb.CHANNELS, 3, mb.NORM)
    for i in range(mb.NUM_CONVS):
        keys.conv_block(f"mask_branch.tower.{i}", mb.CHANNELS, mb.CHANNELS, 3, mb.NORM)
    keys.conv(f"mask_branch.tower.{mb.NUM_CONVS}", mb.OUT_CHANNELS, mb.CHANNELS, 1)
    if mb.SEMANTIC_LOSS_ON:
        keys.conv_block("mask_branch.seg_head.0", c, mb.CHANNELS, 3, mb.NORM)
        keys.conv_block("mask_branch.seg_head.1", mb.CHANNELS, mb.CHANNELS, 3, mb.NORM)
        keys.conv("mask_branch.logits", cfg.MODEL.FCOS.NUM_CLASSES, mb.CHANNELS, 1)
    # dynamic_mask_head: (in + 2) * ch, ch * ch, ch * 1 weights; ch, ch, 1 biases
    ch, cin, n = ci.MASK_HEAD.CHANNELS, mb.OUT_CHANNELS, ci.MASK_HEAD.NUM_LAYERS
    weights = [(cin + 2) * ch] + [ch * ch] * (n - 2) + [ch]
    biases = [ch] * (n - 1) + [1]
    keys.conv("controller", sum(weights) + sum(biases), c, 3)
    keys["mask_head._iter"] = (1,)
    keys["mask_head.sizes_of_interest"] = (len(cfg.MODEL.FCOS.SIZES_OF_INTEREST) + 1,)
    return keys


def adelaidet_blendmask(cfg):
    """AdelaiDet BlendMask: FCOS + top-level top_layer and basis_module (ProtoNet)."""
    keys = adelaidet_fcos_backbone(cfg)
    keys.update(adelaidet_fcos_head(cfg))
    bs, c = cfg.MODEL.BASIS_MODULE, cfg.MODEL.FPN.OUT_CHANNELS
    p = bs.CONVS_DIM
    for i, _ in enumerate(bs.IN_FEATURES):
        keys.conv_block(f"basis_module.refine.{i}", c, p, 3, bs.NORM)
    for i in range(bs.NUM_CONVS):
        keys.conv_block(f"basis_module.tower.{i}", p, p, 3, bs.NORM)
    # then an Upsample (no parameters), one more block, the 1x1 conv to the bases
    keys.conv_block(f"basis_module.tower.{bs.NUM_CONVS + 1}", p, p, 3, bs.NORM)
    keys.conv(f"basis_module.tower.{bs.NUM_CONVS + 2}", bs.NUM_BASES, p, 1)
    if bs.LOSS_ON:
        keys.conv("basis_module.seg_head.0", p, c, 3, bias=False)
        keys.norm("basis_module.seg_head.1", p, "BN")
        keys.conv("basis_module.seg_head.3", p, p, 3, bias=False)
        keys.norm("basis_module.seg_head.4", p, "BN")
        keys.conv("basis_module.seg_head.6", bs.NUM_CLASSES + 1, p, 1)
    m = cfg.MODEL.BLENDMASK.ATTN_SIZE
    keys.conv("top_layer", bs.NUM_BASES * m * m, c, 3)
    return keys


def adelaidet_solov2(cfg):
    """AdelaiDet SOLOv2: Detectron2 FPN (P2-P6, max-pool P6), ins_head, mask_head."""
    keys = resnet_keys(cfg, "backbone.bottom_up.")
    c = cfg.MODEL.FPN.OUT_CHANNELS
    for lvl, cin in zip((2, 3, 4, 5), (256, 512, 1024, 2048)):
        keys.conv(f"backbone.fpn_lateral{lvl}", c, cin, 1)
        keys.conv(f"backbone.fpn_output{lvl}", c, c, 3)
    s = cfg.MODEL.SOLO
    ic, mc = s.INSTANCE_CHANNELS, s.MASK_CHANNELS
    for tower, first_in in (("cate", s.INSTANCE_IN_CHANNELS), ("kernel", s.INSTANCE_IN_CHANNELS + 2)):
        for i in range(s.NUM_INSTANCE_CONVS):
            keys.conv(f"ins_head.{tower}_tower.{3 * i}", ic, first_in if i == 0 else ic, 3, bias=False)
            keys.norm(f"ins_head.{tower}_tower.{3 * i + 1}", ic, "GN")
    keys.conv("ins_head.cate_pred", s.NUM_CLASSES, ic, 3)
    keys.conv("ins_head.kernel_pred", s.NUM_KERNELS, ic, 3)
    for lvl in range(len(s.MASK_IN_FEATURES)):
        for j in range(max(lvl, 1)):
            cin = (s.MASK_IN_CHANNELS + (2 if lvl == 3 else 0)) if j == 0 else mc
            keys.conv(f"mask_head.convs_all_levels.{lvl}.conv{j}.0", mc, cin, 3, bias=False)
            keys.norm(f"mask_head.convs_all_levels.{lvl}.conv{j}.1", mc, "GN")
    keys.conv("mask_head.conv_pred.0", s.NUM_MASKS, mc, 1, bias=False)
    keys.norm("mask_head.conv_pred.1", s.NUM_MASKS, "GN")
    return keys


def adelaidet_meinst(cfg):
    """AdelaiDet MEInst (no DCN): FCOS towers + mask_tower + mask_pred in MEInst_head, and
    the mask_encoding buffers."""
    keys = adelaidet_fcos_backbone(cfg)
    keys.update(adelaidet_fcos_head(cfg, "proposal_generator.MEInst_head"))
    me, c = cfg.MODEL.MEINST, cfg.MODEL.FPN.OUT_CHANNELS
    for i in range(me.NUM_MASK_CONVS):
        keys.conv(f"proposal_generator.MEInst_head.mask_tower.{3 * i}", c, c, 3)
        keys.norm(f"proposal_generator.MEInst_head.mask_tower.{3 * i + 1}", c, "GN")
    keys.conv("proposal_generator.MEInst_head.mask_pred", me.DIM_MASK, c, 3)
    m2 = me.MASK_SIZE ** 2
    keys["proposal_generator.mask_encoding.components"] = (me.DIM_MASK, m2)
    keys["proposal_generator.mask_encoding.explained_variances"] = (me.DIM_MASK,)
    keys["proposal_generator.mask_encoding.means"] = (m2,)
    return keys


def hustvl_sparseinst(cfg):
    """hustvl/SparseInst (R-50, Group-IAM): encoder (laterals C5..C3, outputs, PPM, fusion)
    and decoder (inst_branch, mask_branch)."""
    keys = resnet_keys(cfg, "backbone.")
    si = cfg.MODEL.SPARSE_INST
    c = si.ENCODER.NUM_CHANNELS
    for i, cin in enumerate((2048, 1024, 512)):
        keys.conv(f"encoder.fpn_laterals.{i}", c, cin, 1)
        keys.conv(f"encoder.fpn_outputs.{i}", c, c, 3)
    for i in range(4):
        keys.conv(f"encoder.ppm.stages.{i}.1", c // 4, c, 1)
    keys.conv("encoder.ppm.bottleneck", c, c + 4 * (c // 4), 1)
    keys.conv("encoder.fusion", c, 3 * c, 1)
    d = si.DECODER
    dim, groups = d.INST.DIM, d.GROUPS
    for branch, width, n in (("inst_branch.inst_convs", dim, d.INST.CONVS),
                             ("mask_branch.mask_convs", d.MASK.DIM, d.MASK.CONVS)):
        for i in range(n):
            keys.conv(f"decoder.{branch}.{2 * i}", width, (c + 2) if i == 0 else width, 3)
    keys[f"decoder.inst_branch.iam_conv.weight"] = (d.NUM_MASKS * groups, dim // groups, 3, 3)
    keys[f"decoder.inst_branch.iam_conv.bias"] = (d.NUM_MASKS * groups,)
    e = dim * groups
    keys["decoder.inst_branch.fc.weight"] = (e, e)
    keys["decoder.inst_branch.fc.bias"] = (e,)
    for name, out in (("cls_score", d.NUM_CLASSES), ("mask_kernel", d.KERNEL_DIM), ("objectness", 1)):
        keys[f"decoder.inst_branch.{name}.weight"] = (out, e)
        keys[f"decoder.inst_branch.{name}.bias"] = (out,)
    keys.conv("decoder.mask_branch.projection", d.KERNEL_DIM, d.MASK.DIM, 1)
    return keys


# ----------------------------------------------------------------------------- the check
def check_lands(keys, cfg, expect, expected_dropped=(), **kw):
    model_sd = build_model(cfg).state_dict()
    sd = keys.tensors()
    result = convert_state_dict({"model": sd, "iteration": 3}, target_keys=model_sd.keys(), **kw)
    assert result.converter is not None and result.converter.name == expect
    missing, unexpected, shapes = compare_with_model(result.state_dict, model_sd)
    assert not missing and not unexpected and not shapes, (missing[:5], unexpected[:5], shapes[:5])
    # every source key is accounted for: mapped onto a model key, or dropped for a reason
    assert set(result.mapped) | set(result.dropped) == set(sd)
    assert set(result.dropped) == set(expected_dropped)
    assert set(result.mapped.values()) | set(result.added) == set(result.state_dict)
    for src, dst in result.mapped.items():
        assert torch.equal(result.state_dict[dst], sd[src]), (src, dst)
    return result


def test_adelaidet_fcos():
    cfg = cfg_of("FCOS/R_50_1x.yaml")
    check_lands(Keys(adelaidet_fcos_backbone(cfg) | adelaidet_fcos_head(cfg)), cfg, "adelaidet-fcos",
                {"pixel_mean", "pixel_std"}, source="adelaidet")


@pytest.mark.parametrize("config", ["CondInst/R_50_1x.yaml", "CondInst/R_50_3x_sem.yaml"])
def test_adelaidet_condinst(config):
    cfg = cfg_of(config)
    r = check_lands(adelaidet_condinst(cfg), cfg, "adelaidet-condinst",
                    {"pixel_mean", "pixel_std", "mask_head._iter", "mask_head.sizes_of_interest"},
                    source="adelaidet")
    assert r.mapped["controller.weight"] == "mask_head.controller.weight"
    assert r.mapped["mask_branch.tower.4.bias"] == "mask_head.mask_branch.tower.4.bias"


def test_adelaidet_blendmask():
    cfg = cfg_of("BlendMask/R_50_1x.yaml")
    r = check_lands(adelaidet_blendmask(cfg), cfg, "adelaidet-blendmask", {"pixel_mean", "pixel_std"},
                    source="adelaidet")
    assert r.mapped["top_layer.weight"] == "mask_head.top_layer.weight"
    assert r.state_dict["mask_head.top_layer.weight"].shape[0] == 4 * 14 * 14


def test_adelaidet_blendmask_with_another_attn_size_is_reported():
    """AdelaiDet's checkpoints have M = 14 (as our COCO configs); a model with M = 7: the
    shape mismatch must be named, not silently loaded."""
    src_cfg = cfg_of("BlendMask/R_50_1x.yaml")
    model_sd = build_model(cfg_of("BlendMask/R_50_1x.yaml", "MODEL.BLENDMASK.ATTN_SIZE", "7")).state_dict()
    r = convert_state_dict(adelaidet_blendmask(src_cfg).tensors(), target_keys=model_sd.keys())
    missing, unexpected, shapes = compare_with_model(r.state_dict, model_sd)
    assert not missing and not unexpected
    assert shapes == ["mask_head.top_layer.bias: checkpoint (784,) vs model (196,)",
                      "mask_head.top_layer.weight: checkpoint (784, 256, 3, 3) vs model (196, 256, 3, 3)"]


def test_adelaidet_solov2():
    cfg = cfg_of("SOLO/SOLOv2_R_50_3x.yaml")
    check_lands(adelaidet_solov2(cfg), cfg, "adelaidet-solov2", source="adelaidet")


def test_adelaidet_meinst(tmp_path):
    import numpy as np

    from d2seg.meinst import save_encoding
    from d2seg.meinst.encoding import MaskEncodingParams

    # building our MEInst model needs an encoding file (the checkpoint then overwrites it)
    m, n = 28, 60
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(m * m, n)))
    enc = str(tmp_path / "enc.npz")
    save_encoding(enc, MaskEncodingParams(q.T, np.linspace(2, 1, n), np.zeros(m * m), m, True, True))
    cfg = cfg_of("MEInst/MEInst_R_50_1x.yaml", "MODEL.MEINST.PATH_COMPONENTS", enc,
                 "MODEL.MEINST.ENCODING_DATASET", "")
    r = check_lands(adelaidet_meinst(cfg), cfg, "adelaidet-meinst", {"pixel_mean", "pixel_std"},
                    source="adelaidet")
    assert r.mapped["proposal_generator.MEInst_head.mask_pred.weight"] == "mask_head.mask_pred.weight"
    assert r.mapped["proposal_generator.mask_encoding.means"] == "mask_head.encoding.means"
    assert r.mapped["proposal_generator.MEInst_head.cls_logits.bias"] == "proposal_generator.fcos_head.cls_logits.bias"


def test_hustvl_sparseinst():
    cfg = cfg_of("SparseInst/sparse_inst_r50_giam.yaml")
    src = hustvl_sparseinst(cfg)
    sd = src.tensors()
    # saved from DistributedDataParallel: every key behind "module."
    src = type(src)({"module." + k: v for k, v in src.items()})
    r = check_lands(src, cfg, "sparseinst", source="sparseinst")
    assert all(k.startswith("module.") for k in r.mapped) and len(r.mapped) == len(sd)


def test_pointrend_upstream_checkpoints():
    """Detectron2's own PointRend model (detectron2.projects.point_rend) gives the source keys;
    its version-1 names are converted too."""
    from detectron2.config import get_cfg
    from detectron2.projects import point_rend

    # upstream's Base-RCNN-FPN + Base-PointRend-RCNN-FPN (R-50, COCO): the model behind its
    # published pointrend_rcnn_R_50_FPN_3x_coco checkpoint
    up_cfg = get_cfg()
    point_rend.add_pointrend_config(up_cfg)
    up_cfg.MODEL.DEVICE = "cpu"
    up_cfg.MODEL.MASK_ON = True
    up_cfg.MODEL.RESNETS.DEPTH = 50
    up_cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    up_cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    up_cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    up_cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    up_cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    up_cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    up_cfg.MODEL.ROI_HEADS.NAME = "PointRendROIHeads"
    up_cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    up_cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    up_cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    up_cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    up_cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
    up_cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""
    up_cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
    up_cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    up_cfg.MODEL.POINT_HEAD.NUM_CLASSES = 80
    up_sd = build_model(up_cfg).state_dict()
    # ours: the config the model zoo lists for that checkpoint
    model_sd = build_model(cfg_of("PointRend/pointrend_rcnn_R_50_FPN_3x_coco.yaml")).state_dict()

    r = convert_state_dict(up_sd, source="pointrend-upstream", target_keys=model_sd.keys())
    assert r.converter.name == "pointrend-upstream"
    assert compare_with_model(r.state_dict, model_sd) == ([], [], [])
    assert set(r.mapped) == set(up_sd) and not r.dropped

    # version 1 (first release): roi_heads.mask_point_head / mask_coarse_head.coarse_mask_fcN
    v1 = {}
    for k, v in up_sd.items():
        k = k.replace("roi_heads.mask_head.point_head.", "roi_heads.mask_point_head.")
        k = k.replace("roi_heads.mask_head.coarse_head.fc", "roi_heads.mask_coarse_head.coarse_mask_fc")
        k = k.replace("roi_heads.mask_head.coarse_head.", "roi_heads.mask_coarse_head.")
        v1[k] = v.numpy()  # Detectron2 .pkl files hold numpy arrays
    assert any(k.startswith("roi_heads.mask_point_head.") for k in v1)
    r1 = convert_state_dict({"model": v1, "__author__": "Detectron2 Model Zoo"}, target_keys=model_sd.keys())
    assert r1.converter.name == "pointrend-upstream-v1"
    assert compare_with_model(r1.state_dict, model_sd) == ([], [], [])
    assert r1.mapped["roi_heads.mask_coarse_head.coarse_mask_fc1.weight"] == "roi_heads.mask_head.coarse_head.fc1.weight"
    for src, dst in r1.mapped.items():
        assert torch.equal(r1.state_dict[dst], torch.from_numpy(v1[src]))


def test_detection_and_wrong_source():
    cfg = cfg_of("CondInst/R_50_1x.yaml")
    sd = adelaidet_condinst(cfg)
    assert detect_format(sd).name == "adelaidet-condinst"
    assert detect_format(sd, renaming_only=True).name == "adelaidet-condinst"
    # our own CondInst keys are not mistaken for AdelaiDet's
    ours = build_model(cfg).state_dict()
    assert detect_format(ours, renaming_only=True) is None
    with pytest.raises(ValueError, match="not in a sparseinst format"):
        convert_state_dict(sd, source="sparseinst")
    with pytest.raises(ValueError, match="unknown checkpoint source"):
        detect_format(sd, source="mmdet")


# ----------------------------------------------------------------------------- the CLI
def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def cli_main(*args):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import convert_checkpoint
    finally:
        sys.path.pop(0)
    return convert_checkpoint.main(list(args))


@pytest.fixture(scope="module")
def adelaidet_condinst_file(tmp_path_factory):
    """A small CondInst checkpoint in AdelaiDet's layout (R-18 shapes config; the layout
    itself is covered by test_adelaidet_condinst)."""
    cfg = cfg_of("CondInst/condinst_R18_shapes.yaml")
    ours = build_model(cfg).state_dict()
    src = {}
    for k, v in ours.items():
        k = k.replace("mask_head.controller.", "controller.").replace("mask_head.mask_branch.", "mask_branch.")
        src[k] = torch.randn_like(v) if v.is_floating_point() else v
    src["mask_head._iter"] = torch.zeros(1)
    src["mask_head.sizes_of_interest"] = torch.tensor([32.0, 64, 128, 256, 512])
    src["pixel_mean"] = torch.zeros(3, 1, 1)
    path = tmp_path_factory.mktemp("cli") / "condinst_adelaidet.pth"
    torch.save({"model": src, "iteration": 10}, path)
    return cfg, src, path


def test_cli_converts(adelaidet_condinst_file, tmp_path):
    cfg, src, inp = adelaidet_condinst_file
    out = tmp_path / "out" / "condinst_d2seg.pth"
    p = run_cli("--from", "adelaidet", "--config-file", "CondInst/condinst_R18_shapes.yaml", str(inp), str(out))
    assert p.returncode == 0, p.stderr
    assert "converter: adelaidet-condinst" in p.stderr
    assert "controller.weight -> mask_head.controller.weight" in p.stderr
    assert "dropped mask_head._iter" in p.stderr
    assert "dropped mask_head.sizes_of_interest" in p.stderr
    ckpt = torch.load(out, weights_only=True)
    assert set(ckpt) >= {"model", "__author__"} and "adelaidet-condinst" in ckpt["__author__"]
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    assert torch.equal(model.mask_head.controller.weight, src["controller.weight"])


def test_cli_refuses_another_models_checkpoint(adelaidet_condinst_file, tmp_path, capsys):
    _, _, inp = adelaidet_condinst_file
    bad = tmp_path / "bad.pth"
    assert cli_main("--from", "auto", "--config-file", "configs/SOLO/solov2_shapes.yaml", str(inp), str(bad)) == 1
    err = capsys.readouterr().err
    assert "missing in the checkpoint" in err and "ins_head.cate_pred.weight" in err
    assert "unexpected (not in the model)" in err and "mask_head.controller.weight" in err
    assert not bad.exists() and not (tmp_path / "bad.pth.tmp").exists()

    # a source that does not match the file
    assert cli_main("--from", "sparseinst", "--config-file", "CondInst/condinst_R18_shapes.yaml",
                    str(inp), str(bad)) == 1
    assert "not in a sparseinst format" in capsys.readouterr().err
    # a missing input file
    assert cli_main("--config-file", "CondInst/condinst_R18_shapes.yaml", str(tmp_path / "nope.pth"),
                    str(bad)) == 1
    assert "not found" in capsys.readouterr().err
