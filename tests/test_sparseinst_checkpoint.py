"""Checkpoint compatibility with hustvl/SparseInst.

The reference models here re-state hustvl/SparseInst's module tree (its parameter names)
and forward semantics in a few plain modules, written for this test (their code is not
imported). A reference with random weights is saved as their checkpoints are
({"model": state_dict}), loaded into our model through d2seg.sparseinst.checkpoint, and
both models must give the same outputs on the same input.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

import d2seg  # noqa: F401
from d2seg.config import get_d2seg_cfg
from d2seg.sparseinst.checkpoint import load_hustvl_checkpoint
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone


# ----------------------------------------------------------------------------- their naming
def conv_relu_stack(n, cin, cout):
    mods = []
    for _ in range(n):
        mods += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
        cin = cout
    return nn.Sequential(*mods)


class RefPPM(nn.Module):
    def __init__(self, c, sizes=(1, 2, 3, 6)):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(c, c // 4, 1)) for s in sizes])
        self.bottleneck = nn.Conv2d(c + len(sizes) * (c // 4), c, 1)

    def forward(self, x):
        hw = x.shape[-2:]
        ps = [F.interpolate(F.relu(st(x)), size=hw, mode="bilinear", align_corners=False) for st in self.stages]
        return F.relu(self.bottleneck(torch.cat(ps + [x], 1)))


class RefEncoder(nn.Module):
    def __init__(self, in_channels, c):
        super().__init__()
        self.fpn_laterals = nn.ModuleList([nn.Conv2d(ci, c, 1) for ci in in_channels[::-1]])
        self.fpn_outputs = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1) for _ in in_channels])
        self.ppm = RefPPM(c)
        self.fusion = nn.Conv2d(3 * c, c, 1)

    def forward(self, feats):
        c3, c4, c5 = feats["res3"], feats["res4"], feats["res5"]
        p5 = self.ppm(self.fpn_laterals[0](c5))
        p4 = self.fpn_laterals[1](c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.fpn_laterals[2](c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        o3, o4, o5 = self.fpn_outputs[2](p3), self.fpn_outputs[1](p4), self.fpn_outputs[0](p5)
        size = o3.shape[-2:]
        up = lambda t: F.interpolate(t, size, mode="bilinear", align_corners=False)  # noqa: E731
        return self.fusion(torch.cat([o3, up(o4), up(o5)], 1))


class RefGroupInstBranch(nn.Module):
    def __init__(self, cin, dim, num_masks, kernel_dim, num_classes, groups=4):
        super().__init__()
        self.num_masks = num_masks
        self.inst_convs = conv_relu_stack(4, cin, dim)
        self.iam_conv = nn.Conv2d(dim, num_masks * groups, 3, padding=1, groups=groups)
        self.fc = nn.Linear(dim * groups, dim * groups)
        self.cls_score = nn.Linear(dim * groups, num_classes)
        self.mask_kernel = nn.Linear(dim * groups, kernel_dim)
        self.objectness = nn.Linear(dim * groups, 1)

    def forward(self, x):
        f = self.inst_convs(x)
        a = self.iam_conv(f).sigmoid()
        b, m = a.shape[:2]
        a = a.reshape(b, m, -1)
        z = torch.einsum("bmp,bcp->bmc", a, f.reshape(b, f.shape[1], -1)) / a.sum(-1, keepdim=True).clamp(min=1e-6)
        z = torch.stack([z[:, g * self.num_masks:(g + 1) * self.num_masks] for g in range(4)], dim=2)
        z = F.relu(self.fc(z.reshape(b, self.num_masks, -1)))
        return self.cls_score(z), self.mask_kernel(z), self.objectness(z)


class RefMaskBranch(nn.Module):
    def __init__(self, cin, dim, kernel_dim):
        super().__init__()
        self.mask_convs = conv_relu_stack(4, cin, dim)
        self.projection = nn.Conv2d(dim, kernel_dim, 1)

    def forward(self, x):
        return self.projection(self.mask_convs(x))


class RefDecoder(nn.Module):
    def __init__(self, c, dim=256, num_masks=100, kernel_dim=128, num_classes=80):
        super().__init__()
        self.inst_branch = RefGroupInstBranch(c + 2, dim, num_masks, kernel_dim, num_classes)
        self.mask_branch = RefMaskBranch(c + 2, dim, kernel_dim)

    def forward(self, f):
        b, _, h, w = f.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xx, yy])[None].expand(b, 2, h, w)
        x = torch.cat([coords, f], 1)
        logits, kernels, obj = self.inst_branch(x)
        m = self.mask_branch(x)
        masks = torch.einsum("bnd,bdhw->bnhw", kernels, m)
        masks = F.interpolate(masks, scale_factor=2.0, mode="bilinear", align_corners=False)
        return {"pred_logits": logits, "pred_masks": masks, "pred_scores": obj}


class RefTimmBottleneck(nn.Module):
    """timm's Bottleneck / hustvl's DeformableBottleneck naming (DCNv1 via conv2_offset)."""

    def __init__(self, cin, planes, stride, downsample, deform):
        super().__init__()
        self.deform = deform
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        if deform:
            self.conv2_offset = nn.Conv2d(planes, 18, 3, stride, 1)
            self.conv2 = nn.Module()
            self.conv2.weight = nn.Parameter(torch.empty(planes, planes, 3, 3))
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.stride = stride
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.deform:
            y = deform_conv2d(y, self.conv2_offset(y), self.conv2.weight, stride=self.stride, padding=1)
        else:
            y = self.conv2(y)
        y = self.bn3(self.conv3(F.relu(self.bn2(y))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefResNet50d(nn.Module):
    def __init__(self, deform=(False, False, True, True)):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, 1, 1, bias=False))
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            s = 1 if i == 0 else 2
            pool = nn.AvgPool2d(2, s, ceil_mode=True, count_include_pad=False) if s > 1 else nn.Identity()
            down = nn.Sequential(pool, nn.Conv2d(cin, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4))
            blocks = [RefTimmBottleneck(cin, planes, s, down, deform[i])]
            blocks += [RefTimmBottleneck(planes * 4, planes, 1, None, deform[i]) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = planes * 4

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        out = {}
        for i, name in ((2, "res3"), (3, "res4"), (4, "res5")):
            x = getattr(self, f"layer{i}")(x)
            out[name] = x
        return out


class RefSparseInst(nn.Module):
    def __init__(self, backbone, c=64, dim=64, num_masks=20, kernel_dim=32, num_classes=8):
        super().__init__()
        self.backbone = backbone
        self.encoder = RefEncoder([512, 1024, 2048], c)
        self.decoder = RefDecoder(c, dim, num_masks, kernel_dim, num_classes)

    def forward(self, x):
        return self.decoder(self.encoder(self.backbone(x)))


def randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) / math.sqrt(fan_in) if p.dim() > 1 else torch.randn_like(p) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                m.weight.copy_(torch.rand_like(m.weight) * 0.5 + 0.5)
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.1)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return model.eval()


def paper_cfg(backbone_name):
    cfg = get_d2seg_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SparseInst"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    # Paper layout (4 convs per branch, Group-IAM with 4 groups) at reduced widths to keep
    # the test fast; the reference below is built with the same numbers.
    si = cfg.MODEL.SPARSE_INST
    si.ENCODER.NUM_CHANNELS, si.DECODER.INST.DIM, si.DECODER.MASK.DIM = 64, 64, 64
    si.DECODER.NUM_MASKS, si.DECODER.KERNEL_DIM, si.DECODER.NUM_CLASSES = 20, 32, 8
    return cfg


def compare(ours, ref, size=(64, 96)):
    torch.manual_seed(1)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        a, b = ours.predict(x), ref(x)
    for k in ("pred_logits", "pred_masks", "pred_scores"):
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4, msg=k)
    assert b["pred_masks"].std() > 1e-3


# ----------------------------------------------------------------------------- tests
def test_r50_giam_checkpoint_loads_and_matches():
    """sparse_inst_r50_giam: Detectron2 R-50 (FrozenBN) + encoder + Group-IAM decoder."""
    cfg = paper_cfg("build_resnet_backbone")
    ref = randomise(RefSparseInst(build_resnet_backbone(cfg, ShapeSpec(channels=3))))
    ours = build_model(cfg).eval()
    ckpt = {"model": ref.state_dict(), "iteration": 0}
    assert set(ckpt["model"]) == set(ours.state_dict())
    load_hustvl_checkpoint(ours, ckpt)
    compare(ours, ref)


def test_r50vd_dcn_giam_checkpoint_loads_and_matches():
    """sparse_inst_r50vd_dcn_giam: ResNet-D with DCN on res4/res5 in timm naming. The reference
    uses nn.BatchNorm2d (keys incl. num_batches_tracked), ours FrozenBN."""
    cfg = paper_cfg("build_sparseinst_resnet_vd_backbone")
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, True, True]
    ref = randomise(RefSparseInst(RefResNet50d()))
    ours = build_model(cfg).eval()
    ref_keys = {k for k in ref.state_dict() if not k.endswith("num_batches_tracked")}
    assert ref_keys == set(ours.state_dict())
    load_hustvl_checkpoint(ours, {"model": ref.state_dict()})
    compare(ours, ref)


def test_r50_dcn_backbone_runs_without_detectron2_C():
    """R-50-DCN through Detectron2's ResNet: deformable blocks built on torchvision, names
    as Detectron2's (conv2_offset, conv2.weight, conv2.norm)."""
    cfg = paper_cfg("build_sparseinst_resnet_backbone")
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, True, True]
    cfg.MODEL.RESNETS.NORM = "GN"
    backbone = build_backbone(cfg)
    keys = set(backbone.state_dict())
    assert "res4.0.conv2_offset.weight" in keys and "res4.0.conv2.norm.weight" in keys
    assert "res3.0.conv2_offset.weight" not in keys
    # deformable offsets are zero at init, so a random offset must change the output
    block = backbone.res4[1]
    x = torch.randn(1, 1024, 6, 6)
    y0 = block(x)
    with torch.no_grad():
        block.conv2_offset.bias.normal_()
    assert not torch.allclose(block(x), y0)
    assert backbone(torch.randn(1, 3, 64, 64))["res5"].shape == (1, 2048, 2, 2)
    backbone.res5[0](torch.randn(1, 1024, 4, 4)).sum().backward()
    assert backbone.res5[0].conv2.weight.grad.abs().sum() > 0
    assert backbone.res5[0].conv2_offset.weight.grad is not None


def test_mismatched_checkpoint_is_reported():
    cfg = paper_cfg("build_resnet_backbone")
    cfg.MODEL.SPARSE_INST.DECODER.NAME = "BaseIAMDecoder"
    ours = build_model(cfg)
    ref = RefSparseInst(build_resnet_backbone(cfg, ShapeSpec(channels=3)))
    with pytest.raises((KeyError, RuntimeError)):
        load_hustvl_checkpoint(ours, {"model": ref.state_dict()})
