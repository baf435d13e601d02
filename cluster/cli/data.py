"""`kd data digits|folder`: write WebDataset shards."""
from __future__ import annotations

import argparse


def cmd_data_digits(args: argparse.Namespace) -> int:
    from student_trainer.data.write_shards import write_digits_shards

    summaries = write_digits_shards(args.out, seed=args.seed, image_size=args.image_size,
                                    val_fraction=args.val_fraction,
                                    samples_per_shard=args.samples_per_shard,
                                    image_format=args.image_format)
    for split, s in summaries.items():
        print(f"{split}: {s.samples} samples in {len(s.shards)} shards under {args.out}")
    return 0


def cmd_data_folder(args: argparse.Namespace) -> int:
    from student_trainer.data.write_shards import write_folder_shards

    s = write_folder_shards(args.images, args.captions, args.out, split=args.split,
                            max_shard_samples=args.max_shard_samples,
                            max_shard_bytes=args.max_shard_mb * 2**20)
    print(f"{s.split}: wrote {s.samples} samples in {len(s.shards)} shards under {args.out}")
    skipped = sum(s.skipped.values())
    print(f"skipped {skipped}" + (": " + ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items()))
                                  if skipped else ""))
    return 0


def add_parser(sub, fmt) -> None:
    data = sub.add_parser("data", help="write WebDataset shards", formatter_class=fmt,
                          description="Write WebDataset shards (jpg/png, txt caption, cls, json).")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    p = data_sub.add_parser("digits", formatter_class=fmt,
                            help="train/val shards from scikit-learn's bundled handwritten digits",
                            description="Deterministic train/val shards from scikit-learn's bundled "
                                        "8x8 digits, upscaled to RGB, with templated captions.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="split and caption seed")
    p.add_argument("--image-size", type=int, default=32, help="side of the stored RGB images")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction held out for val")
    p.add_argument("--samples-per-shard", type=int, default=200, help="samples per tar shard")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png", help="image member type")
    p.set_defaults(func=cmd_data_digits)
    p = data_sub.add_parser("folder", formatter_class=fmt,
                            help="shards from your own images and a captions file",
                            description="Shards from an image folder and a CSV/TSV/JSONL captions "
                                        "file (columns image, caption[, label]). Unreadable images "
                                        "and missing captions are skipped and counted.")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--captions", required=True, help="captions file: .csv, .tsv or .jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--split", default="train", help="shard name prefix (train, val, ...)")
    p.add_argument("--max-shard-samples", type=int, default=1000, help="samples per shard at most")
    p.add_argument("--max-shard-mb", type=int, default=256, help="shard size limit in MiB")
    p.set_defaults(func=cmd_data_folder)
