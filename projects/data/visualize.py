"""Save a grid of data set images with their annotations drawn by Detectron2's Visualizer.

    python -m d2seg.data.visualize --dataset shapes_val --num 8 --scale 3 \
        --out docs/shapes_sample.png

Works for any registered instances data set (it reads records from DatasetCatalog).
"""
import argparse

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.visualizer import Visualizer


def draw_records(dataset_name, num=8, scale=3.0, columns=4, start=0):
    """(H, W, 3) uint8 RGB grid of the first ``num`` records from ``start`` on."""
    records = DatasetCatalog.get(dataset_name)[start:start + num]
    meta = MetadataCatalog.get(dataset_name)
    tiles = []
    for rec in records:
        image = cv2.imread(rec["file_name"], cv2.IMREAD_COLOR)[:, :, ::-1]
        vis = Visualizer(image, metadata=meta, scale=scale)
        tiles.append(vis.draw_dataset_dict(rec).get_image())
    if not tiles:
        raise ValueError(f"data set '{dataset_name}' has no records from index {start}")
    h, w = tiles[0].shape[:2]
    while len(tiles) % columns:
        tiles.append(np.full((h, w, 3), 255, np.uint8))
    rows = [np.concatenate(tiles[i:i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def main(argv=None):
    import d2seg  # noqa: F401  (registers the built-in data sets)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="shapes_val")
    parser.add_argument("--num", type=int, default=8)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    grid = draw_records(args.dataset, args.num, args.scale, args.columns, args.start)
    cv2.imwrite(args.out, grid[:, :, ::-1])
    print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
