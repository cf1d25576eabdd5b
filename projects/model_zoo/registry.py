"""The table of named checkpoints: ``d2seg://<name>`` -> URL, sha256, converter, config.

d2seg publishes no trained weights of its own (everything here was trained from scratch
on CPU data). The table lists upstream checkpoints whose layout d2seg converts: the URLs
are the ones their projects' READMEs give (aim-uofa/AdelaiDet ``configs/*/README.md``,
facebookresearch/detectron2 ``projects/PointRend``, hustvl/SparseInst ``README.md``).

**Checksums.** None of those projects publishes a sha256, and no file could be downloaded
on the machine this was written on, so every upstream entry has ``sha256=None``. Such an
entry is refused unless the caller opts in (``allow_unverified=True`` or
``D2SEG_ALLOW_UNVERIFIED=1``); Detectron2 ``.pkl`` files additionally need the pickle
opt-in (``D2SEG_ALLOW_PICKLE=1``), because only files verified against a checksum in this
table may be unpickled. Fill in a sha256 (``sha256sum file``) once a file was obtained
from a trusted source; the entry is then used without any opt-in.

Entries with ``direct=False`` point at a web page (Google Drive), not at a file: download
by hand and put the file at ``entry.cache_path()``; from then on it resolves offline.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["CheckpointEntry", "CHECKPOINTS", "register_checkpoint", "unregister_checkpoint",
           "get_checkpoint", "find_by_url", "find_by_config"]


@dataclass(frozen=True)
class CheckpointEntry:
    """One named checkpoint.

    Attributes:
        name: the registry name (``d2seg://<name>``).
        url: where the file is published.
        sha256: its hex sha256, or None when unknown (then using it needs an opt-in).
        converter: name of the :mod:`d2seg.model_zoo.converters` converter its keys need
            (None: already d2seg's layout).
        config: the d2seg config (relative to configs/) whose model the weights fit.
        opts: config overrides needed on top of ``config`` (KEY, VALUE, ...).
        filename: the cache file name (URLs like ``.../download`` carry none).
        direct: False when ``url`` is a web page rather than the file.
        note: anything a user must know (training set, differences).
    """

    name: str
    url: str
    sha256: Optional[str]
    converter: Optional[str]
    config: str
    filename: str
    opts: Tuple[str, ...] = ()
    direct: bool = True
    note: str = ""

    def cache_path(self) -> str:
        import os

        from .download import cache_dir

        return os.path.join(cache_dir(), "zoo", self.name, self.filename)

    def fetch(self, allow_unverified: Optional[bool] = None) -> str:
        """The local path of this checkpoint: cached (and re-verified) or downloaded."""
        import os

        from .download import (
            ChecksumMismatchError, DownloadError, UnverifiedDownloadError, _download, _env_flag, sha256_of,
        )

        if allow_unverified is None:
            allow_unverified = _env_flag("D2SEG_ALLOW_UNVERIFIED")
        if self.sha256 is None and not allow_unverified:
            raise UnverifiedDownloadError(
                f"d2seg://{self.name}: no sha256 is known for {self.url}, so it is not used without an "
                f"explicit opt-in (D2SEG_ALLOW_UNVERIFIED=1, or allow_unverified=True).")
        dst = self.cache_path()
        if os.path.isfile(dst):
            if self.sha256 is None:
                return dst
            digest = sha256_of(dst)
            if digest == self.sha256:
                return dst
            if not self.direct:
                raise ChecksumMismatchError(
                    f"d2seg://{self.name}: {dst} has sha256 {digest}, expected {self.sha256}")
            os.unlink(dst)
        if not self.direct:
            raise DownloadError(
                f"d2seg://{self.name}: {self.url} is a web page, not a file; download the checkpoint "
                f"by hand and save it as {dst}")
        _download(self.url, dst, self.sha256, timeout=60.0)
        return dst


CHECKPOINTS: Dict[str, CheckpointEntry] = {}


def register_checkpoint(entry: CheckpointEntry, overwrite: bool = False) -> CheckpointEntry:
    if entry.sha256 is not None and (len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256)):
        raise ValueError(f"checkpoint {entry.name!r}: sha256 must be 64 lowercase hex digits, got {entry.sha256!r}")
    if entry.name in CHECKPOINTS and not overwrite:
        raise KeyError(f"checkpoint {entry.name!r} is already registered")
    CHECKPOINTS[entry.name] = entry
    return entry


def unregister_checkpoint(name: str) -> None:
    CHECKPOINTS.pop(name, None)


def get_checkpoint(name: str) -> CheckpointEntry:
    if name not in CHECKPOINTS:
        raise KeyError(f"no checkpoint named {name!r} in the d2seg model zoo; known: {sorted(CHECKPOINTS)}")
    return CHECKPOINTS[name]


def find_by_url(url: str) -> Optional[CheckpointEntry]:
    return next((e for e in CHECKPOINTS.values() if e.url == url), None)


def find_by_config(config_path: str) -> List[CheckpointEntry]:
    return [e for e in CHECKPOINTS.values() if e.config == config_path]


# ----------------------------------------------------------------------------- the table
_CLOUDSTOR = "https://cloudstor.aarnet.edu.au/plus/s/{}/download"
_D2 = "https://dl.fbaipublicfiles.com/detectron2/PointRend/InstanceSegmentation/{}"
_GDRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"

_ADELAIDET = [
    # name, cloudstor token, converter, config, opts, note
    ("FCOS_R_50_1x", "glqFc13cCoEyHYy", "adelaidet-fcos", "FCOS/R_50_1x.yaml", (), "box AP 38.7 (AdelaiDet)"),
    ("FCOS_MS_R_50_2x", "reA6HVaGX47yKGV", "adelaidet-fcos", "FCOS/R_50_1x.yaml", (),
     "box AP 41.0 (AdelaiDet); a 2x schedule of the same model"),
    ("FCOS_MS_R_101_2x", "M3UOT6JcyHy2QW1", "adelaidet-fcos", "FCOS/R_101_1x.yaml", (), "box AP 43.1 (AdelaiDet)"),
    ("CondInst_MS_R_50_1x", "Trx1r4tLJja7sLT", "adelaidet-condinst", "CondInst/R_50_1x.yaml", (),
     "mask AP 35.7 (AdelaiDet)"),
    ("CondInst_MS_R_50_3x", "T3OGVBiaSVLvo5E", "adelaidet-condinst", "CondInst/R_50_3x.yaml", (),
     "mask AP 37.5 (AdelaiDet)"),
    ("CondInst_MS_R_101_3x", "vWLiYm8OnrTSUD2", "adelaidet-condinst", "CondInst/R_101_3x.yaml", (),
     "mask AP 38.6 (AdelaiDet)"),
    ("CondInst_MS_R_50_3x_sem", "75Ag8VvC6WedVNh", "adelaidet-condinst", "CondInst/R_50_3x_sem.yaml", (),
     "mask AP 38.2 (AdelaiDet)"),
    ("CondInst_MS_R_101_3x_sem", "M8nNxSR5iNP4qyO", "adelaidet-condinst", "CondInst/R_101_3x_sem.yaml", (),
     "mask AP 39.8 (AdelaiDet)"),
    ("BlendMask_R_50_1x", "zoxXPnr6Hw3OJgK", "adelaidet-blendmask", "BlendMask/R_50_1x.yaml", (),
     "mask AP 35.8 (AdelaiDet)"),
    ("BlendMask_R_50_3x", "ZnaInHFEKst6mvg", "adelaidet-blendmask", "BlendMask/R_50_3x.yaml", (),
     "mask AP 37.8 (AdelaiDet)"),
    ("BlendMask_R_101_3x", "e4fXrliAcMtyEBy", "adelaidet-blendmask", "BlendMask/R_101_3x.yaml", (),
     "mask AP 39.5 (AdelaiDet)"),
    ("MEInst_R_50_1x_none", "v49Av8jn9hDkSAT", "adelaidet-meinst", "MEInst/MEInst_R_50_1x.yaml", (),
     "mask AP 30.7 (AdelaiDet), the variant without DCN; config match not verified on the real file"),
    ("SOLOv2_R50_3x", "chF3VKQT4RDoEqC", "adelaidet-solov2", "SOLO/SOLOv2_R_50_3x.yaml", (),
     "mask AP 37.6 (AdelaiDet)"),
]
for _name, _token, _conv, _cfg, _opts, _note in _ADELAIDET:
    register_checkpoint(CheckpointEntry(
        name=f"adelaidet/{_name}", url=_CLOUDSTOR.format(_token), sha256=None, converter=_conv,
        config=_cfg, filename=f"{_name}.pth", opts=_opts, note=_note))

_POINTREND = [
    ("pointrend_rcnn_R_50_FPN_3x_coco", "164955410/model_final_3c3198.pkl", "PointRend/pointrend_rcnn_R_50_FPN_3x_coco.yaml"),
    ("pointrend_rcnn_R_101_FPN_3x_coco", "28119983/model_final_3f4d2a.pkl", "PointRend/pointrend_rcnn_R_101_FPN_3x_coco.yaml"),
    ("pointrend_rcnn_X_101_32x8d_FPN_3x_coco", "28119989/model_final_ba17b9.pkl",
     "PointRend/pointrend_rcnn_X_101_32x8d_FPN_3x_coco.yaml"),
]
for _name, _file, _cfg in _POINTREND:
    register_checkpoint(CheckpointEntry(
        name=f"detectron2/PointRend/{_name}", url=_D2.format(f"{_name}/{_file}"), sha256=None,
        converter="pointrend-upstream", config=_cfg, filename=_file.split("/")[-1],
        note="Detectron2 .pkl: needs D2SEG_ALLOW_PICKLE=1 as long as no sha256 is recorded"))

_SPARSEINST = [
    ("sparse_inst_r50_giam", "1pXU7Dsa1L7nUiLU9ULG2F6Pl5m5NEguL", "SparseInst/sparse_inst_r50_giam.yaml"),
    ("sparse_inst_r50_giam_aug", "1MK8rO3qtA7vN9KVSBdp0VvZHCNq8-bvz", "SparseInst/sparse_inst_r50_giam_aug.yaml"),
    ("sparse_inst_r50_dcn_giam_aug", "1qxdLRRHbIWEwRYn-NPPeCCk6fhBjc946", "SparseInst/sparse_inst_r50_dcn_giam_aug.yaml"),
    ("sparse_inst_r50vd_dcn_giam_aug", "1clYPdCNrDNZLbmlAEJ7wjsrOLn1igOpT",
     "SparseInst/sparse_inst_r50vd_dcn_giam_aug.yaml"),
]
for _name, _id, _cfg in _SPARSEINST:
    register_checkpoint(CheckpointEntry(
        name=f"hustvl/SparseInst/{_name}", url=_GDRIVE.format(_id), sha256=None, converter="sparseinst",
        config=_cfg, filename=f"{_name}.pth", direct=False,
        note="Google Drive page: download by hand into the cache path"))
