"""The table of named checkpoints: ``d2seg://<name>`` -> mirrors, sha256, size, converter,
config.

d2seg publishes no trained weights of its own (everything in this project was trained from
scratch on CPU data). The table lists upstream checkpoints whose layout d2seg converts, at
the hosts that serve them today:

- **AdelaiDet** (FCOS, CondInst, BlendMask, MEInst, SOLOv2): the Hugging Face mirrors that
  replaced cloudstor.aarnet.edu.au (decommissioned in December 2023; AdelaiDet's README
  links them since its PR #626): ``tianzhi/AdelaiDet-FCOS``, ``tianzhi/AdelaiDet-CondInst``
  and ``ZjuCv/AdelaiDet``, as ``resolve/main/<file>`` URLs (``blob/`` URLs return an HTML
  page). Each entry is **pinned**: its sha256 (and, where a commit page shows it, its size
  in bytes) is the Git LFS object id published on the file's Hugging Face page, listed in
  ``pages``. Where two mirrors publish the same hash, both are listed and tried in order.
- **Detectron2's PointRend** (``dl.fbaipublicfiles.com``) and **hustvl/SparseInst** (Google
  Drive): no checksum is published anywhere, so these entries are **unpinned**; each says
  why in ``unpinned``. Using one needs either a pin made on first download
  (``python -m d2seg.model_zoo download NAME --pin``, which prints the sha256 to add here
  and records it beside the cached file, so that later uses are verified), or the explicit
  opt-in ``D2SEG_ALLOW_UNVERIFIED=1``. Never a silent trust.

A local pin lives at ``<cache>/zoo/<name>/<file>.sha256`` (see :meth:`CheckpointEntry.pin_path`).

Besides these, :data:`LOCAL_CHECKPOINTS` names checkpoints made on this machine on first use
(``d2seg://shapes/...``: a backbone pretrained on the shapes world, by
:mod:`d2seg.data.pretrained`).
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .download import (
    UnverifiedDownloadError, cache_dir, download, env_flag, sha256_of, use_cached,
)

__all__ = ["PREFIX", "CheckpointEntry", "LocalCheckpoint", "CHECKPOINTS", "LOCAL_CHECKPOINTS",
           "register_checkpoint", "unregister_checkpoint", "get_checkpoint", "find_by_url", "find_by_config"]

logger = logging.getLogger(__name__)

PREFIX = "d2seg://"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CheckpointEntry:
    """One named checkpoint.

    Attributes:
        name: the registry name (``d2seg://<name>``).
        urls: mirrors of the same file, tried in order (direct file URLs).
        sha256: its hex sha256 (pinned), or None when no checksum is published; then
            ``unpinned`` must say why.
        converter: name of the :mod:`d2seg.model_zoo.converters` converter its keys need.
        config: the d2seg config (relative to configs/) whose model the weights fit.
        filename: the cache file name.
        method: the method's name, for listings ("CondInst").
        metric: the accuracy its publisher reports ("mask AP 35.7"), for listings.
        size: the file's size in bytes, when published (checked before the body is read).
        opts: config overrides needed on top of ``config`` (KEY, VALUE, ...).
        unpinned: why there is no sha256 (required when ``sha256`` is None).
        pages: where the URL, sha256 and size were read (public pages).
        manual: what to do by hand when no mirror delivers (e.g. Google Drive's quota).
        note: anything else a user must know (training set, config differences).
    """

    name: str
    urls: Tuple[str, ...]
    sha256: Optional[str]
    converter: Optional[str]
    config: str
    filename: str
    method: str = ""
    metric: str = ""
    size: Optional[int] = None
    opts: Tuple[str, ...] = ()
    unpinned: str = ""
    pages: Tuple[str, ...] = ()
    manual: str = ""
    note: str = ""

    @property
    def url(self) -> str:
        """The first mirror."""
        return self.urls[0]

    def cache_path(self, root: Optional[str] = None) -> str:
        """``<root or cache>/zoo/<name>/<filename>``."""
        return os.path.join(root or cache_dir(), "zoo", self.name, self.filename)

    def pin_path(self, root: Optional[str] = None) -> str:
        """Where a sha256 pinned on first download is recorded (beside the cached file)."""
        return self.cache_path(root) + ".sha256"

    def local_pin(self, root: Optional[str] = None) -> Optional[str]:
        """The sha256 recorded by ``download --pin``, or None."""
        path = self.pin_path(root)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            value = f.read().split()[0].lower() if os.path.getsize(path) else ""
        if not _HEX64.match(value):
            raise ValueError(f"{path} must hold the 64-hex sha256 of {self.filename}, got {value!r}; "
                             f"delete it and pin again")
        return value

    def expected_sha256(self, root: Optional[str] = None) -> Optional[str]:
        """The table's sha256, else a local pin, else None."""
        return self.sha256 or self.local_pin(root)

    def checksum_status(self, root: Optional[str] = None) -> str:
        """"pinned", "pinned locally" or "unpinned" (for listings)."""
        if self.sha256:
            return "pinned"
        return "pinned locally" if self.local_pin(root) else "unpinned"

    def fetch(self, allow_unverified: Optional[bool] = None, pin: bool = False, root: Optional[str] = None,
              **download_kwargs) -> str:
        """The local path of this checkpoint: cached (re-verified on every use) or downloaded
        and verified.

        Args:
            allow_unverified: use an unpinned entry without a checksum (None: the
                D2SEG_ALLOW_UNVERIFIED environment variable decides).
            pin: for an unpinned entry: download it, record its sha256 as a local pin and
                log the line to add to this table (trust on first use, asked for by name).
            root: the cache folder (default :func:`~d2seg.model_zoo.download.cache_dir`).
            download_kwargs: passed to :func:`~d2seg.model_zoo.download.download` (timeout,
                retries, backoff).
        Raises:
            UnverifiedDownloadError, DownloadError, ChecksumMismatchError.
        """
        if allow_unverified is None:
            allow_unverified = env_flag("D2SEG_ALLOW_UNVERIFIED")
        sha256 = self.expected_sha256(root)
        if sha256 is None and not (allow_unverified or pin):
            raise UnverifiedDownloadError(
                f"{PREFIX}{self.name} is not pinned: {self.unpinned} It is not used unchecked without asking. "
                f"Pin it on first download with `python -m d2seg.model_zoo download {self.name} --pin` "
                f"(records its sha256 beside the cached file and prints it), or opt in to an unchecked "
                f"file with D2SEG_ALLOW_UNVERIFIED=1.")
        dst = self.cache_path(root)
        if not use_cached(dst, sha256, PREFIX + self.name):
            where = f"Download it by hand from {' or '.join(self.urls)} and save it as {dst}"
            hint = self.manual.format(dst=dst) if self.manual else where + "."
            download(self.urls, dst, sha256, self.size, hint=hint, **download_kwargs)
        if sha256 is None and pin:
            self._write_pin(dst, root)
        return dst

    def _write_pin(self, dst: str, root: Optional[str]) -> str:
        digest = sha256_of(dst)
        path = self.pin_path(root)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{digest}  {self.filename}\n")
        os.replace(tmp, path)
        logger.info(f"Pinned {PREFIX}{self.name}: sha256 {digest} ({os.path.getsize(dst)} bytes), recorded in "
                    f"{path}. To pin it for everyone, set sha256=\"{digest}\" and size={os.path.getsize(dst)} "
                    f"in its entry of d2seg/model_zoo/registry.py.")
        return digest


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint made on this machine on first use, not downloaded (``d2seg://shapes/...``)."""

    name: str
    method: str
    description: str


CHECKPOINTS: Dict[str, CheckpointEntry] = {}

LOCAL_CHECKPOINTS: Dict[str, LocalCheckpoint] = {
    "shapes/R18-GN-pretrained": LocalCheckpoint(
        "shapes/R18-GN-pretrained", "backbone",
        "ResNet-18-GN of the shapes configs pretrained as a classifier of shapes crops; made on first use "
        "(d2seg.data.pretrained)"),
}


def register_checkpoint(entry: CheckpointEntry, overwrite: bool = False) -> CheckpointEntry:
    """Add ``entry`` to :data:`CHECKPOINTS` (checked: a 64-lowercase-hex sha256 or a reason
    in ``unpinned``, at least one URL, a unique name)."""
    if entry.sha256 is not None and not _HEX64.match(entry.sha256):
        raise ValueError(f"checkpoint {entry.name!r}: sha256 must be 64 lowercase hex digits, got {entry.sha256!r}")
    if entry.sha256 is None and not entry.unpinned:
        raise ValueError(f"checkpoint {entry.name!r} has no sha256: say why in `unpinned`")
    if not entry.urls or isinstance(entry.urls, str):
        raise ValueError(f"checkpoint {entry.name!r}: urls must be a non-empty tuple of URLs")
    if entry.name in CHECKPOINTS and not overwrite:
        raise KeyError(f"checkpoint {entry.name!r} is already registered")
    CHECKPOINTS[entry.name] = entry
    return entry


def unregister_checkpoint(name: str) -> None:
    CHECKPOINTS.pop(name, None)


def get_checkpoint(name: str) -> CheckpointEntry:
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    if name not in CHECKPOINTS:
        raise KeyError(f"no checkpoint named {name!r} in the d2seg model zoo; known: {sorted(CHECKPOINTS)} "
                       f"(and, made locally: {sorted(LOCAL_CHECKPOINTS)})")
    return CHECKPOINTS[name]


def find_by_url(url: str) -> Optional[CheckpointEntry]:
    """The entry one of whose mirrors is ``url``."""
    return next((e for e in CHECKPOINTS.values() if url in e.urls), None)


def find_by_config(config_path: str) -> List[CheckpointEntry]:
    return [e for e in CHECKPOINTS.values() if e.config == config_path]


# ----------------------------------------------------------------------------- the table
_HF = "https://huggingface.co/{}/resolve/main/{}"
_HF_PAGE = "https://huggingface.co/"
_FCOS, _CONDINST, _ZJUCV = "tianzhi/AdelaiDet-FCOS", "tianzhi/AdelaiDet-CondInst", "ZjuCv/AdelaiDet"
_UNVERIFIED_CONFIG = "; the match of this config with the real file was not checked (no download here)"

# name, method, file, repos (mirror order), sha256, size (None: not published to the byte),
# converter, config, metric (AdelaiDet's READMEs), pages (relative to huggingface.co/), note
_ADELAIDET = [
    ("FCOS_R_50_1x", "FCOS", "FCOS_R_50_1x.pth", (_FCOS, _ZJUCV),
     "2b63bea109ab38e7528828f4f4cc23cff2720720a9e809bfc9a494fc0d800f36", 129471951,
     "adelaidet-fcos", "FCOS/R_50_1x.yaml", "box AP 38.7",
     (f"{_FCOS}/blob/06e20ab8de2f078133c4471eca620a564959c7e6/FCOS_R_50_1x.pth",
      f"{_ZJUCV}/blob/f2826fb119565198f0b163fd2cbf90cf7a2bf439/FCOS_R_50_1x.pth",
      f"{_ZJUCV}/commit/6610f1a2490f05ef3677d9258bbe51e53212c841"), ""),
    ("FCOS_MS_R_50_2x", "FCOS", "FCOS_MS_R_50_2x.pth", (_FCOS,),
     "aad1a7ca6380c70b333db94378714e441c0207bca4470c33f0fa9cb60dc8b246", 129471951,
     "adelaidet-fcos", "FCOS/R_50_3x.yaml", "box AP 41.0",
     (f"{_FCOS}/blob/06e20ab8de2f078133c4471eca620a564959c7e6/FCOS_MS_R_50_2x.pth",
      f"{_FCOS}/commit/3b0a633f815a9c527b76132ac1f1f615777040a3"),
     "multi-scale training, 2x schedule; the same model as the multi-scale config"),
    ("FCOS_MS_R_101_2x", "FCOS", "FCOS_MS_R_101_2x.pth", (_FCOS, _ZJUCV),
     "32eb6e39404ea999305e80be9b11c17f0651886439bb2651636ef06f60ffde3d", 205704640,
     "adelaidet-fcos", "FCOS/R_101_3x.yaml", "box AP 43.1",
     (f"{_FCOS}/blob/06e20ab8de2f078133c4471eca620a564959c7e6/FCOS_MS_R_101_2x.pth",
      f"{_ZJUCV}/blob/fdc5b44d6f94403891a1df248d9195080527da1c/FCOS_MS_R_101_2x.pth",
      f"{_FCOS}/commit/06e20ab8de2f078133c4471eca620a564959c7e6"),
     "multi-scale training, 2x schedule; the same model as the multi-scale config"),
    ("CondInst_MS_R_50_1x", "CondInst", "CondInst_MS_R_50_1x.pth", (_CONDINST, _ZJUCV),
     "dacbe466377098c90189d9e3464013b84809eed5b0ace71fa87a5876db4f6972", 136956635,
     "adelaidet-condinst", "CondInst/R_50_1x.yaml", "mask AP 35.7",
     (f"{_CONDINST}/blob/main/CondInst_MS_R_50_1x.pth",
      f"{_ZJUCV}/blob/5c5d730fe150f67d6c36f7e0e7e3d15e72e1ab8e/CondInst_MS_R_50_1x.pth",
      f"{_ZJUCV}/commit/16487ff61465149fae3a9b0a15669ea1fca5af3d"), ""),
    ("CondInst_MS_R_50_3x", "CondInst", "CondInst_MS_R_50_3x.pth", (_CONDINST,),
     "5f3d214f0d660a910324d6229139b4150438ba18fcb7fbb05c334e59c058d826", 136956635,
     "adelaidet-condinst", "CondInst/R_50_3x.yaml", "mask AP 37.5",
     (f"{_CONDINST}/blob/main/CondInst_MS_R_50_3x.pth",
      f"{_CONDINST}/commit/a0288e75d3ad42599a58841d037d3293ea13ab0c"), ""),
    ("CondInst_MS_R_101_3x", "CondInst", "CondInst_MS_R_101_3x.pth", (_CONDINST,),
     "4d3f2e82ccce199862a063e384d8bef0291f3291626b0379dc5f18859c4995ac", 213189324,
     "adelaidet-condinst", "CondInst/R_101_3x.yaml", "mask AP 38.6",
     (f"{_CONDINST}/blob/main/CondInst_MS_R_101_3x.pth",
      f"{_CONDINST}/commit/a0288e75d3ad42599a58841d037d3293ea13ab0c"),
     "ZjuCv/AdelaiDet also holds a file of this name, but no page showing its hash was found, so it is "
     "not listed as a mirror"),
    ("CondInst_MS_R_50_3x_sem", "CondInst", "CondInst_MS_R_50_3x_sem.pth", (_CONDINST,),
     "f017865be3f15fb06017811d9666af7120abad0790c9492ef41bd6f1e10c9103", 138774419,
     "adelaidet-condinst", "CondInst/R_50_3x_sem.yaml", "mask AP 38.2",
     (f"{_CONDINST}/blob/main/CondInst_MS_R_50_3x_sem.pth",
      f"{_CONDINST}/commit/b8abab40a3268312b2399c033b1a63c3d128bc3d"), ""),
    ("CondInst_MS_R_101_3x_sem", "CondInst", "CondInst_MS_R_101_3x_sem.pth", (_CONDINST,),
     "dffc36a0e2a303aa96373d786193c19f6313d268c81fd2260389d30ec7835295", 215007108,
     "adelaidet-condinst", "CondInst/R_101_3x_sem.yaml", "mask AP 39.8",
     (f"{_CONDINST}/blob/main/CondInst_MS_R_101_3x_sem.pth",
      f"{_CONDINST}/commit/a0288e75d3ad42599a58841d037d3293ea13ab0c"), ""),
    ("BlendMask_R_50_1x", "BlendMask", "R_50_1x.pth", (_ZJUCV,),
     "9e9c2ff3fa4b6500294679d7acaabb5898587d8e8c7a3e10f5869bbcee97a5dd", 144429928,
     "adelaidet-blendmask", "BlendMask/R_50_1x.yaml", "mask AP 35.8",
     (f"{_ZJUCV}/blob/5c5d730fe150f67d6c36f7e0e7e3d15e72e1ab8e/R_50_1x.pth",
      f"{_ZJUCV}/commit/9b354ba3f3939e569a069a1e1b6481d51d3373ec"), ""),
    ("BlendMask_R_50_3x", "BlendMask", "R_50_3x.pth", (_ZJUCV,),
     "b25d31f6075ad3e09a267e0d410c6418afd9ff9c77f6bb3677ca4aeb76b750ed", 144429928,
     "adelaidet-blendmask", "BlendMask/R_50_3x.yaml", "mask AP 37.8",
     (f"{_ZJUCV}/blob/main/R_50_3x.pth", f"{_ZJUCV}/commit/3569b4f40a8e5a43e9d763d0294fe0221c00a683"),
     "AdelaiDet's README links its instance and its panoptic R_50_3x to this one file; its size equals "
     "R_50_1x.pth's, so it is taken to be the instance model (a panoptic file would carry "
     "panoptic_module.* keys, which the converter drops and reports)"),
    ("BlendMask_R_101_3x", "BlendMask", "R_101_3x.pth", (_ZJUCV,),
     "446ca00b58d592c25234b6ad718ce7b43f217b6cd3d071ab4b8d93f6d896a32b", None,
     "adelaidet-blendmask", "BlendMask/R_101_3x.yaml", "mask AP 39.5",
     (f"{_ZJUCV}/blob/main/R_101_3x.pth",),
     "the README links the instance and the panoptic R_101_3x to this one file (see BlendMask_R_50_3x)"),
    ("BlendMask_550_R_50_3x", "BlendMask", "550_R_50_3x.pth", (_ZJUCV,),
     "f902e55e7520be4a47862c54772594294f0716dd2ebfdd99a3b6684b84133170", None,
     "adelaidet-blendmask", "BlendMask/550_R_50_3x.yaml", "mask AP 34.5",
     (f"{_ZJUCV}/blob/main/550_R_50_3x.pth",), "BlendMask-RT at 550 px" + _UNVERIFIED_CONFIG),
    ("MEInst_R_50_1x_none", "MEInst", "MEInst_R_50_1x_none.pth", (_ZJUCV,),
     "e3b4e782a2e5e928b98f884d273702e572baaf19a9b9d3d63e2e73cc93123a59", None,
     "adelaidet-meinst", "MEInst/MEInst_R_50_1x.yaml", "mask AP 30.7",
     (f"{_ZJUCV}/blob/5c5d730fe150f67d6c36f7e0e7e3d15e72e1ab8e/MEInst_R_50_1x_none.pth",),
     "the variant without DCN"),
    ("MEInst_R_50_1x", "MEInst", "MEInst_R_50_1x.pth", (_ZJUCV,),
     "2281b1362a20f9614fccf9ec14b7adb2fab5c7c9f6bb4b3e67c7ff7fa456a8be", 140167307,
     "adelaidet-meinst", "MEInst/MEInst_R_50_1x_dcn.yaml", "mask AP 31.7",
     (f"{_ZJUCV}/commit/fae136137bb7bba6bbf072cb3093e003ec24833c",),
     "DCNv1 in the last layer of the towers, converted to DCNv2 (docs/meinst.md)"),
    ("MEInst_R_50_3x", "MEInst", "MEInst_R_50_3x.pth", (_ZJUCV,),
     "0128cd7a326c804400e1b81219aba1c5e78236c66fe64d9b2850eb22f8c125b5", 140167307,
     "adelaidet-meinst", "MEInst/MEInst_R_50_3x_dcn.yaml", "mask AP 34.5",
     (f"{_ZJUCV}/blob/main/MEInst_R_50_3x.pth", f"{_ZJUCV}/commit/8122c696dd062cb2e313c6b956578fff4a853fd9"),
     "DCNv1 in the last layer of the towers, converted to DCNv2" + _UNVERIFIED_CONFIG),
    ("SOLOv2_R50_3x", "SOLOv2", "SOLOv2_R50_3x.pth", (_ZJUCV,),
     "361eb419f4398c7d7ef1292c007b767746c01a277a3b5393de84f05cdacf1d05", 371953777,
     "adelaidet-solov2", "SOLO/SOLOv2_R_50_3x.yaml", "mask AP 37.6",
     (f"{_ZJUCV}/commit/19a62290ecea4d0e03bdc210533eef91bf76efb8",),
     "xinlongwang/SOLO holds a different file of this name (another sha256, mmdetection's SOLO zoo): "
     "not a mirror"),
    ("SOLOv2_R101_3x", "SOLOv2", "SOLOv2_R101_3x.pth", (_ZJUCV,),
     "689b8ce6dd82b3a1a2f8f146266e88e8e807bffaf5def04d2fd886b4a8f71aa9", 524083079,
     "adelaidet-solov2", "SOLO/SOLOv2_R_101_3x.yaml", "mask AP 39.0",
     (f"{_ZJUCV}/blob/main/SOLOv2_R101_3x.pth", f"{_ZJUCV}/commit/0868fbbcf5ce9e6a06a6903e6a14f55a92866884"),
     _UNVERIFIED_CONFIG[2:]),
]
for (_name, _method, _file, _repos, _sha, _size, _conv, _cfg, _metric, _pages, _note) in _ADELAIDET:
    register_checkpoint(CheckpointEntry(
        name=f"adelaidet/{_name}", urls=tuple(_HF.format(r, _file) for r in _repos), sha256=_sha, size=_size,
        converter=_conv, config=_cfg, filename=_file, method=_method, metric=_metric,
        pages=tuple(_HF_PAGE + p for p in _pages),
        note=_note))

_D2 = "https://dl.fbaipublicfiles.com/detectron2/PointRend/{}/{}/{}"
_D2_PAGE = "https://github.com/facebookresearch/detectron2/blob/main/projects/PointRend/README.md"
_D2_UNPINNED = ("Detectron2 publishes no checksum for its model zoo files (the suffix of model_final_xxxxxx.pkl "
                "is not a hash prefix).")
_POINTREND = [  # name, file, metric (Detectron2's PointRend README), task folder
    ("pointrend_rcnn_R_50_FPN_1x_coco", "164254221/model_final_736f5a.pkl", "mask AP 36.2", "InstanceSegmentation"),
    ("pointrend_rcnn_R_50_FPN_3x_coco", "164955410/model_final_edd263.pkl", "mask AP 38.3", "InstanceSegmentation"),
    ("pointrend_rcnn_R_101_FPN_3x_coco", "28119983/model_final_3f4d2a.pkl", "mask AP 40.1", "InstanceSegmentation"),
    ("pointrend_rcnn_X_101_32x8d_FPN_3x_coco", "28119989/model_final_ba17b9.pkl", "mask AP 41.1",
     "InstanceSegmentation"),
    ("pointrend_rcnn_R_50_FPN_1x_cityscapes", "164255101/model_final_115bfb.pkl", "mask AP 35.9 (Cityscapes)",
     "InstanceSegmentation"),
    ("pointrend_semantic_R_101_FPN_1x_cityscapes", "202576688/model_final_cf6ac1.pkl", "mIoU 78.9 (Cityscapes)",
     "SemanticSegmentation"),
]
for _name, _file, _metric, _task in _POINTREND:
    register_checkpoint(CheckpointEntry(
        name=f"detectron2/PointRend/{_name}", urls=(_D2.format(_task, _name, _file),), sha256=None,
        converter="pointrend-upstream", config=f"PointRend/{_name}.yaml", filename=_file.split("/")[-1],
        method="PointRend", metric=_metric, unpinned=_D2_UNPINNED, pages=(_D2_PAGE,),
        note="Detectron2 .pkl (numpy arrays): read by d2seg's restricted unpickler, no pickle opt-in needed"))

_GDRIVE_FILE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
_GDRIVE_UC = "https://drive.google.com/uc?export=download&id={}"
_GDRIVE_VIEW = "https://drive.google.com/file/d/{}/view"
_SPARSEINST_PAGE = "https://github.com/hustvl/SparseInst/blob/main/README.md"
_SPARSEINST = [
    ("sparse_inst_r50_giam", "1pXU7Dsa1L7nUiLU9ULG2F6Pl5m5NEguL", "mask AP 33.4 (val)"),
    ("sparse_inst_r50_giam_aug", "1MK8rO3qtA7vN9KVSBdp0VvZHCNq8-bvz", "mask AP 34.2 (val)"),
    ("sparse_inst_r50_dcn_giam_aug", "1qxdLRRHbIWEwRYn-NPPeCCk6fhBjc946", "mask AP 36.4 (val)"),
    ("sparse_inst_r50vd_dcn_giam_aug", "1clYPdCNrDNZLbmlAEJ7wjsrOLn1igOpT", "mask AP 37.4 (val)"),
]
for _name, _id, _metric in _SPARSEINST:
    register_checkpoint(CheckpointEntry(
        name=f"hustvl/SparseInst/{_name}", urls=(_GDRIVE_FILE.format(_id), _GDRIVE_UC.format(_id)), sha256=None,
        converter="sparseinst", config=f"SparseInst/{_name}.yaml", filename=f"{_name}.pth",
        method="SparseInst", metric=_metric,
        unpinned="hustvl/SparseInst publishes its weights on Google Drive and BaiduPan only, with no checksum.",
        pages=(_SPARSEINST_PAGE,),
        manual=(f"If Google Drive refuses (its daily quota for a shared file), download it in a browser from "
                f"{_GDRIVE_VIEW.format(_id)} (or from BaiduPan https://pan.baidu.com/s/1tot7Wcoi4J1xh8ZS7VikZg, "
                f"password lkdo) and save it as {{dst}}; then pin it with "
                f"`python -m d2seg.model_zoo download hustvl/SparseInst/{_name} --pin`."),
        note="Google Drive: the large-file confirmation form is followed"))
