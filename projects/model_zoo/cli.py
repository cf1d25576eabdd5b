"""``python -m d2seg.model_zoo``: see and fetch the model zoo.

    python -m d2seg.model_zoo list                      # every entry: method, config, size, AP, checksum
    python -m d2seg.model_zoo download adelaidet/FCOS_R_50_1x 'adelaidet/CondInst_*' --to /nfs/$USER/d2seg_cache
    python -m d2seg.model_zoo download detectron2/PointRend/pointrend_rcnn_R_50_FPN_3x_coco --pin

``download`` fills a cache folder (``--to DIR``, default ``$D2SEG_CACHE`` or d2seg's default
cache) so that machines without network can use it: point ``D2SEG_CACHE`` at that folder there.
Names may carry the ``d2seg://`` prefix and may be shell-style patterns. ``--pin`` downloads an
unpinned entry (no published checksum), records its sha256 beside the cached file (later
uses are verified against it) and prints the sha256 to add to the registry.
"""
import argparse
import fnmatch
import logging
import os
import sys
from typing import List, Optional

from .download import DownloadError, cache_dir
from .registry import CHECKPOINTS, LOCAL_CHECKPOINTS, PREFIX
from .weights import LOCAL_PREFIX

__all__ = ["main", "format_table", "expand_names"]

logger = logging.getLogger("d2seg.model_zoo")


def _size(n: Optional[int]) -> str:
    return f"{n / 1e6:.0f} MB" if n else "?"


def format_table(root: Optional[str] = None) -> str:
    """The zoo as a text table: name, method, config, size, published metric, checksum."""
    rows = [(e.name, e.method, e.config, _size(e.size), e.metric, e.checksum_status(root))
            for e in sorted(CHECKPOINTS.values(), key=lambda e: e.name)]
    rows += [(e.name, e.method, "-", "-", "-", "made on first use") for e in LOCAL_CHECKPOINTS.values()]
    head = ("name (d2seg://...)", "method", "config (configs/...)", "size", "published", "checksum")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def expand_names(patterns: List[str]) -> List[str]:
    """Registry names matching ``patterns`` (exact names or shell-style patterns, with or
    without ``d2seg://``), in order, without repeats. Raises KeyError for a pattern that
    matches nothing."""
    known = sorted(CHECKPOINTS) + sorted(LOCAL_CHECKPOINTS)
    out = []
    for p in patterns:
        p = p[len(PREFIX):] if p.startswith(PREFIX) else p
        hits = [p] if p in known else fnmatch.filter(known, p)
        if not hits:
            raise KeyError(f"no model zoo entry matches {p!r}; see `python -m d2seg.model_zoo list`")
        out += [h for h in hits if h not in out]
    return out


def _download(args) -> int:
    try:
        names = expand_names(args.names)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    root = os.path.abspath(args.to) if args.to else cache_dir()  # absolute: printed for other machines
    failed = 0
    for name in names:
        try:
            if name.startswith(LOCAL_PREFIX):
                from d2seg.data.pretrained import resolve_pretrained

                print(f"{name}: made locally -> {resolve_pretrained(name)} (not a download; --to does not apply)")
                continue
            entry = CHECKPOINTS[name]
            was = entry.expected_sha256(root)
            path = entry.fetch(allow_unverified=args.allow_unverified or None, pin=args.pin, root=root)
            sha = entry.expected_sha256(root)
            if sha is None:
                print(f"{name}: {path} (NOT verified: no checksum known; pin it with --pin)")
            elif was is None:
                print(f"{name}: {path}\n  pinned locally: sha256 {sha} (recorded in {entry.pin_path(root)})\n"
                      f"  to pin it for everyone, add to its registry entry: sha256=\"{sha}\"")
            else:
                print(f"{name}: {path} (sha256 {sha} verified)")
        except (DownloadError, OSError, ValueError) as e:
            failed += 1
            print(f"error: {name}: {e}", file=sys.stderr)
    if args.to and not failed:
        print(f"On the machines that use this cache: export D2SEG_CACHE={root}")
    return 1 if failed else 0


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m d2seg.model_zoo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="print every entry: name, method, config, size, published AP, checksum")
    ls.add_argument("--to", metavar="DIR", help="the cache whose local pins to show (default: D2SEG_CACHE)")
    dl = sub.add_parser("download", help="download entries into a cache (verified)")
    dl.add_argument("names", nargs="+", metavar="NAME", help="registry names or patterns, e.g. 'adelaidet/*'")
    dl.add_argument("--to", metavar="DIR", help="cache folder to fill (default: D2SEG_CACHE or d2seg's cache)")
    dl.add_argument("--pin", action="store_true",
                    help="for unpinned entries: download, record the sha256 beside the file and print it")
    dl.add_argument("--allow-unverified", action="store_true",
                    help="download unpinned entries without pinning them (nothing is verified)")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "list":
        print(format_table(args.to))
        return 0
    return _download(args)
