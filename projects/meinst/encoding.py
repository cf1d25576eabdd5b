"""The linear mask encoding of MEInst (Zhang et al., CVPR 2020, Sec. 3.2): PCA over
box-cropped, m x m instance masks, learnt offline; its file format; the module that
encodes targets and decodes predictions.

Shape shorthand in this module:
    B: masks in a batch, R: detections, m: mask side (MASK_SIZE), D = m * m pixels,
    N: kept components (DIM_MASK, the length of the code vector v)

Encoding (paper Eq. 1):  v = T (u - mean),   u~ = W v + mean,  with
    T = diag(1 / sqrt(var)) C  (whiten)  or  C,   W = C^T diag(sqrt(var))  or  C^T,
where C (N, D) holds the N leading principal directions of the centred training masks
and var (N,) their explained variances. ``u`` is the flattened mask, in probability
space or, with ``sigmoid``, in logit space (the mask clamped to [eps, 1 - eps] first).

File (.npz, ``ENCODING_FILE_VERSION``): version, mask_size, whiten, sigmoid,
components (N, D), explained_variance (N,), mean (D,), num_masks, dataset.
AdelaiDet's files (components_c, explained_variance_c, mean_c with a leading axis of 1)
are read too; their whiten/sigmoid flags come from the caller (they are in its name).
"""
import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ENCODING_FILE_VERSION",
    "SIGMOID_EPS",
    "MaskEncodingError",
    "MaskEncodingParams",
    "MaskStatistics",
    "MaskEncoding",
    "load_encoding",
    "save_encoding",
    "masks_to_signal",
    "mask_iou",
]

ENCODING_FILE_VERSION = 1
# Binary masks are clamped to [SIGMOID_EPS, 1 - SIGMOID_EPS] before the logit.
SIGMOID_EPS = 0.01
_MIN_VARIANCE = 1e-12
# Whitening divides by sqrt(max(var, _REL_MIN_VARIANCE * var[0])): directions with
# (almost) no variance in the training set would otherwise blow up the codes of unseen
# masks. Encode -> decode is unaffected (T and W use the same scale).
_REL_MIN_VARIANCE = 1e-4
# Training masks whose largest variance is below this have (almost) none to whiten by (e.g.
# every mask fills its box, as in a data set whose masks are its boxes): the codes are
# left unscaled (scale 1), else the noise of the targets' clamp would be divided by ~0.
_DEGENERATE_VARIANCE = 1e-6


class MaskEncodingError(ValueError):
    """A mask-encoding file that is corrupt or does not fit the config."""


class MaskEncodingParams:
    """A learnt encoding (numpy arrays).

    Attributes:
        components: (N, D) orthonormal rows, leading principal directions first.
        explained_variance: (N,) variance of the training signal along each direction.
        mean: (D,) mean training signal.
        mask_size: m, with D == m * m.
        whiten, sigmoid: bool, see the module doc.
        num_masks: number of training masks it was learnt from (0 if unknown).
        dataset: name of the data set it was learnt from ("" if unknown).
    """

    def __init__(self, components, explained_variance, mean, mask_size, whiten, sigmoid,
                 num_masks=0, dataset=""):
        self.components = np.asarray(components, dtype=np.float64)
        self.explained_variance = np.asarray(explained_variance, dtype=np.float64)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.mask_size = int(mask_size)
        self.whiten = bool(whiten)
        self.sigmoid = bool(sigmoid)
        self.num_masks = int(num_masks)
        self.dataset = str(dataset)
        d = self.mask_size ** 2
        n = self.components.shape[0] if self.components.ndim == 2 else -1
        if (self.components.ndim != 2 or self.components.shape[1] != d
                or self.explained_variance.shape != (n,) or self.mean.shape != (d,)):
            raise MaskEncodingError(
                f"inconsistent mask encoding: components {self.components.shape}, "
                f"explained_variance {self.explained_variance.shape}, mean {self.mean.shape} "
                f"for mask_size {self.mask_size} (expected (N, {d}), (N,), ({d},))."
            )
        if not (np.isfinite(self.components).all() and np.isfinite(self.mean).all()
                and np.isfinite(self.explained_variance).all()):
            raise MaskEncodingError("mask encoding holds non-finite values.")

    @property
    def num_components(self) -> int:
        return self.components.shape[0]

    def truncated(self, n: int) -> "MaskEncodingParams":
        """The same encoding with only its first ``n`` components."""
        if not 1 <= n <= self.num_components:
            raise MaskEncodingError(f"cannot keep {n} of {self.num_components} components.")
        return MaskEncodingParams(self.components[:n], self.explained_variance[:n], self.mean,
                                  self.mask_size, self.whiten, self.sigmoid, self.num_masks,
                                  self.dataset)

    def scale(self) -> np.ndarray:
        """(N,) per-component scale of the codes (sqrt of the floored variance, or 1 without
        whitening or when the masks have no variance)."""
        if not self.whiten:
            return np.ones_like(self.explained_variance)
        ev = self.explained_variance
        if float(ev.max(initial=0.0)) < _DEGENERATE_VARIANCE:
            return np.ones_like(ev)
        floor = max(_MIN_VARIANCE, _REL_MIN_VARIANCE * float(ev.max(initial=0.0)))
        return np.sqrt(np.maximum(ev, floor))

    def projection(self) -> np.ndarray:
        """T, (N, D)."""
        return self.components / self.scale()[:, None]

    def reconstruction(self) -> np.ndarray:
        """W, (D, N)."""
        return (self.components * self.scale()[:, None]).T


class MaskStatistics:
    """Streaming first and second moments of flattened masks, and the PCA from them.

    Memory is O(D^2) whatever the number of masks: (784, 784) float64 for m = 28.
    """

    def __init__(self, mask_size: int, sigmoid: bool):
        self.mask_size = int(mask_size)
        self.sigmoid = bool(sigmoid)
        d = self.mask_size ** 2
        self.count = 0
        self.sum = np.zeros(d, dtype=np.float64)
        self.outer = np.zeros((d, d), dtype=np.float64)
        self._eig = None

    def update(self, masks: Tensor) -> None:
        """Add a batch of masks, (B, m, m) with values in [0, 1]."""
        x = masks_to_signal(masks, self.sigmoid).double().cpu().numpy()
        if x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"masks of {x.shape[1]} pixels, statistics of {self.sum.shape[0]}.")
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self._eig = None

    def fit(self, num_components: int, whiten: bool, dataset: str = "") -> MaskEncodingParams:
        """PCA keeping ``num_components`` directions (eigendecomposition of the covariance)."""
        if self.count < 2:
            raise MaskEncodingError(
                f"need at least 2 masks to learn a mask encoding, got {self.count}"
                + (f" from data set '{dataset}'" if dataset else "") + "."
            )
        d = self.sum.shape[0]
        if not 1 <= num_components <= d:
            raise MaskEncodingError(f"num_components must be in [1, {d}], got {num_components}.")
        mean = self.sum / self.count
        if self._eig is None:
            cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
            cov = (cov + cov.T) / 2
            evals, evecs = np.linalg.eigh(cov)
            order = np.argsort(evals)[::-1]
            evals = np.maximum(evals[order], 0.0)
            evecs = evecs[:, order].T
            # Deterministic sign: the largest-magnitude entry of each direction is positive.
            idx = np.abs(evecs).argmax(1)
            evecs *= np.sign(evecs[np.arange(d), idx])[:, None]
            self._eig = (evals, evecs)
        evals, evecs = self._eig
        return MaskEncodingParams(evecs[:num_components], evals[:num_components], mean,
                                  self.mask_size, whiten, self.sigmoid, self.count, dataset)


def masks_to_signal(masks: Tensor, sigmoid: bool, eps=SIGMOID_EPS) -> Tensor:
    """(B, m, m) or (B, D) masks in [0, 1] -> (B, D) signal u (logits if ``sigmoid``).

    eps: the clamp [eps, 1 - eps] before the logit: a number, or a (B, D) tensor (one per
    pixel, e.g. AdelaiDet's random clamp of the training targets)."""
    x = masks.flatten(1).float()  # flatten, not reshape(B, -1): B may be 0
    if sigmoid:
        if isinstance(eps, Tensor):
            eps = eps.to(x.dtype)
            x = torch.minimum(torch.maximum(x, eps), 1.0 - eps)
        else:
            x = x.clamp(eps, 1.0 - eps)
        x = torch.log(x) - torch.log1p(-x)
    return x


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of binary masks (B, ...) pairwise by row -> (B,); 1 where both are empty."""
    a = a.flatten(1).bool()
    b = b.flatten(1).bool()
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class MaskEncoding(nn.Module):
    """Frozen encoder/decoder of m x m masks (buffers, saved in checkpoints).

    Buffer names follow AdelaiDet's PCAMaskEncoding (``components``,
    ``explained_variances``, ``means``), so its checkpoints map one to one.
    """

    def __init__(self, mask_size: int, num_components: int, whiten: bool = True, sigmoid: bool = True):
        super().__init__()
        self.mask_size = int(mask_size)
        self.num_components = int(num_components)
        self.whiten = bool(whiten)
        self.sigmoid = bool(sigmoid)
        d = self.mask_size ** 2
        self.register_buffer("components", torch.zeros(self.num_components, d))
        self.register_buffer("explained_variances", torch.ones(self.num_components))
        self.register_buffer("means", torch.zeros(d))

    @classmethod
    def from_params(cls, params: MaskEncodingParams) -> "MaskEncoding":
        enc = cls(params.mask_size, params.num_components, params.whiten, params.sigmoid)
        enc.load_params(params)
        return enc

    def load_params(self, params: MaskEncodingParams) -> None:
        if (params.mask_size, params.num_components) != (self.mask_size, self.num_components):
            raise MaskEncodingError(
                f"encoding has m={params.mask_size}, N={params.num_components}; "
                f"module expects m={self.mask_size}, N={self.num_components}."
            )
        self.components.copy_(torch.from_numpy(params.components))
        self.explained_variances.copy_(torch.from_numpy(params.explained_variance))
        self.means.copy_(torch.from_numpy(params.mean))

    def _scale(self) -> Tensor:
        ev = self.explained_variances
        if not self.whiten:
            return torch.ones_like(ev)
        if not ev.numel() or float(ev.max()) < _DEGENERATE_VARIANCE:
            return torch.ones_like(ev)
        floor = (_REL_MIN_VARIANCE * ev.max()).clamp(min=_MIN_VARIANCE)
        return torch.maximum(ev, floor).sqrt()

    def projection(self) -> Tensor:
        """T, (N, D)."""
        return self.components / self._scale()[:, None]

    def reconstruction(self) -> Tensor:
        """W, (D, N)."""
        return (self.components * self._scale()[:, None]).t()

    def encode(self, masks: Tensor, eps=SIGMOID_EPS) -> Tensor:
        """(B, m, m) or (B, D) masks in [0, 1] -> (B, N) codes v = T (u - mean).
        ``eps``: the clamp before the logit (see :func:`masks_to_signal`)."""
        u = masks_to_signal(masks, self.sigmoid, eps).to(self.means.dtype)
        if u.shape[1] != self.means.shape[0]:
            raise ValueError(f"masks of {u.shape[1]} pixels, encoding of m*m={self.means.shape[0]}.")
        return (u - self.means) @ self.projection().t()

    def decode(self, codes: Tensor, activate: bool = True) -> Tensor:
        """(R, N) codes -> (R, m, m): one matrix product for all R.

        activate: True gives mask probabilities (sigmoid of the logits, or the linear
        reconstruction clamped to [0, 1]); False gives the raw reconstruction W v + mean
        (logits when ``sigmoid``), e.g. for a BCE loss on the mask.
        """
        if codes.dim() != 2 or codes.shape[1] != self.num_components:
            raise ValueError(f"codes must be (R, {self.num_components}), got {tuple(codes.shape)}.")
        u = codes.to(self.means.dtype) @ self.reconstruction().t() + self.means
        if activate:
            u = u.sigmoid() if self.sigmoid else u.clamp(0.0, 1.0)
        return u.view(-1, self.mask_size, self.mask_size)

    def extra_repr(self) -> str:
        return (f"mask_size={self.mask_size}, num_components={self.num_components}, "
                f"whiten={self.whiten}, sigmoid={self.sigmoid}")


def save_encoding(path: str, params: MaskEncodingParams) -> None:
    """Write ``params`` to ``path`` (.npz), atomically (a temp file then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(
        tmp,
        version=np.int64(ENCODING_FILE_VERSION),
        mask_size=np.int64(params.mask_size),
        whiten=np.bool_(params.whiten),
        sigmoid=np.bool_(params.sigmoid),
        components=params.components.astype(np.float32),
        explained_variance=params.explained_variance.astype(np.float32),
        mean=params.mean.astype(np.float32),
        num_masks=np.int64(params.num_masks),
        dataset=np.str_(params.dataset),
    )
    os.replace(tmp, path)


def load_encoding(
    path: str,
    mask_size: Optional[int] = None,
    num_components: Optional[int] = None,
    whiten: Optional[bool] = None,
    sigmoid: Optional[bool] = None,
    what: str = "MODEL.MEINST.PATH_COMPONENTS",
) -> MaskEncodingParams:
    """Read an encoding file and check it against the expected m and N.

    A file with more than ``num_components`` components is an error too (a different N
    than the config's means a different model). For AdelaiDet's files, ``whiten`` and
    ``sigmoid`` must be given. ``what`` names the config key in error messages.

    Raises:
        FileNotFoundError: no file at ``path``.
        MaskEncodingError: unreadable, wrong version, missing keys, or wrong m / N.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(
            f"MEInst mask-encoding file not found: {what}={path!r}. Learn it with "
            f"`python tools/meinst_encoding.py --dataset <train set> --mask-size "
            f"{mask_size or 28} --num-components {num_components or 60} --output {path or 'X.npz'}`, "
            f"or set {what} '' to learn it from DATASETS.TRAIN on first use."
        )
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as e:  # zip / header / pickle errors
        raise MaskEncodingError(f"cannot read mask-encoding file {path} ({what}): {e}") from e

    if "components_c" in data:  # AdelaiDet's file
        missing = [k for k in ("components_c", "explained_variance_c", "mean_c") if k not in data]
        if missing or whiten is None or sigmoid is None:
            raise MaskEncodingError(
                f"{path}: AdelaiDet encoding file needs keys components_c, explained_variance_c, "
                f"mean_c (missing {missing}) and explicit whiten/sigmoid flags."
            )
        comps = np.asarray(data["components_c"])[0]
        d = comps.shape[-1]
        m = int(round(np.sqrt(d)))
        params_kw = dict(components=comps, explained_variance=np.asarray(data["explained_variance_c"])[0],
                         mean=np.asarray(data["mean_c"])[0], mask_size=m, whiten=whiten, sigmoid=sigmoid,
                         dataset="adelaidet")
    else:
        needed = ("version", "mask_size", "whiten", "sigmoid", "components", "explained_variance", "mean")
        missing = [k for k in needed if k not in data]
        if missing:
            raise MaskEncodingError(f"{path} ({what}) is not a mask-encoding file: missing keys {missing}.")
        version = int(data["version"])
        if version != ENCODING_FILE_VERSION:
            raise MaskEncodingError(
                f"{path}: encoding file version {version}, this code reads version "
                f"{ENCODING_FILE_VERSION}; re-create it with tools/meinst_encoding.py."
            )
        params_kw = dict(components=data["components"], explained_variance=data["explained_variance"],
                         mean=data["mean"], mask_size=int(data["mask_size"]), whiten=bool(data["whiten"]),
                         sigmoid=bool(data["sigmoid"]), num_masks=int(data.get("num_masks", 0)),
                         dataset=str(data.get("dataset", "")))
    try:
        params = MaskEncodingParams(**params_kw)
    except MaskEncodingError as e:
        raise MaskEncodingError(f"{path} ({what}): {e}") from None
    if mask_size is not None and params.mask_size != int(mask_size):
        raise MaskEncodingError(
            f"{path} was learnt for {params.mask_size}x{params.mask_size} masks but the config "
            f"has MODEL.MEINST.MASK_SIZE={mask_size}."
        )
    if num_components is not None and params.num_components != int(num_components):
        raise MaskEncodingError(
            f"{path} has {params.num_components} components but the config has "
            f"MODEL.MEINST.DIM_MASK={num_components}."
        )
    for flag, want in (("whiten", whiten), ("sigmoid", sigmoid)):
        if want is not None and getattr(params, flag) != bool(want):
            raise MaskEncodingError(
                f"{path} has {flag}={getattr(params, flag)} but the config has "
                f"MODEL.MEINST.{flag.upper()}={want}."
            )
    return params
