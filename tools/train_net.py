#!/usr/bin/env python
"""Train or evaluate any d2seg method (or any Detectron2 model) with Detectron2's launcher.

    python tools/train_net.py --config-file configs/quick/mask_rcnn_shapes.yaml
    python tools/train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
    python tools/train_net.py --config-file X.yaml --resume          # continue a killed run
    python tools/train_net.py --config-file X.yaml --num-gpus 2      # 2 processes (gloo on CPU)
    torchrun --nproc-per-node 2 tools/train_net.py --config-file X.yaml  # the same, started by torchrun
    python tools/train_net.py --config-file X.yaml \
        --register-coco my_train ann/train.json images/train --register-coco my_val ann/val.json images/val \
        DATASETS.TRAIN "('my_train',)" DATASETS.TEST "('my_val',)"   # your own COCO-format data

On a machine without a GPU, MODEL.DEVICE is set to "cpu" automatically.
"""
import logging
import os
import sys

import torch
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import d2seg  # noqa: F401  (registers every method and the built-in data sets)
from d2seg.config import flag_among_opts
from d2seg.engine import AtomicCheckpointer, Trainer, setup_cfg
from d2seg.engine.classes import apply_dataset_classes, config_class_keys


def register_datasets(args):
    """--register-coco NAME JSON IMAGE_ROOT (repeatable), in every launched process."""
    from d2seg.data import register_coco_dataset

    for name, json_file, image_root in args.register_coco or []:
        register_coco_dataset(name, json_file, image_root)


def setup(args):
    register_datasets(args)  # before the config: class counts follow the training data
    cfg = setup_cfg(args.config_file, args.opts, freeze=False, follow_dataset_classes=False)
    # d2seg's log (console and OUTPUT_DIR/log.txt) before the class counts, which log what they set
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="d2seg")
    apply_dataset_classes(cfg, *config_class_keys(args.config_file, args.opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if args.resume:
        logging.getLogger("d2seg").info(f"Resuming at iteration {trainer.start_iter}")
    return trainer.train()


def get_parser():
    parser = default_argument_parser()
    parser.add_argument("--register-coco", nargs=3, action="append", metavar=("NAME", "JSON", "IMAGE_ROOT"),
                        help="register a COCO-format instances data set under NAME (repeatable); "
                             "use it in DATASETS.TRAIN / DATASETS.TEST")
    return parser


def parse_args(argv=None):
    """The command line's arguments; a flag after the KEY VALUE overrides is an error that
    says so (with the usage), exit status 2."""
    parser = get_parser()
    args = parser.parse_args(argv)
    problem = flag_among_opts(args.opts)
    if problem:
        parser.error(problem)
    return args


def torchrun_worker():
    """(local rank, world size, processes per machine, machine rank) of this process when
    torchrun started it (torchrun's environment variables), else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    env = os.environ
    return (int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"]),
            int(env["GROUP_RANK"]))


def invoke_main():
    args = parse_args()
    print("Command Line Args:", args)
    worker = torchrun_worker()
    if worker is not None:
        # torchrun started one process per GPU already: join its group (env://) as
        # Detectron2's launcher joins the processes it starts (--num-gpus etc. are not used)
        from detectron2.engine.launch import _distributed_worker

        local_rank, world_size, per_machine, machine_rank = worker
        _distributed_worker(local_rank, main, world_size, per_machine, machine_rank, "env://", (args,))
        return
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
