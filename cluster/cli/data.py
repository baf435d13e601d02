"""`kd data digits|folder|idx`: write WebDataset shards."""
from __future__ import annotations

import argparse
from pathlib import Path


def _print_splits(summaries: dict, out: str) -> None:
    for split, s in summaries.items():
        print(f"{split}: {s.samples} samples in {len(s.shards)} shards under {out}")


def cmd_data_digits(args: argparse.Namespace) -> int:
    from student_trainer.data.templates import load_templates
    from student_trainer.data.write_shards import write_digits_shards

    summaries = write_digits_shards(args.out, seed=args.seed, image_size=args.image_size,
                                    val_fraction=args.val_fraction,
                                    samples_per_shard=args.samples_per_shard,
                                    image_format=args.image_format, templates=load_templates(args.templates))
    _print_splits(summaries, args.out)
    return 0


def _idx_files(args: argparse.Namespace, preset) -> dict:
    """The splits' files: those named on the command line (only those splits), else found in --dir."""
    from student_trainer.data.idx import IdxFiles, find_idx_files

    named = {split: (getattr(args, f"{split}_images"), getattr(args, f"{split}_labels")) for split in ("train", "val")}
    for split, (images, labels) in named.items():
        if bool(images) != bool(labels):
            raise ValueError(f"--{split}-images and --{split}-labels go together (got only one)")
    files = {split: IdxFiles(Path(images), Path(labels)) for split, (images, labels) in named.items() if images}
    return files or find_idx_files(args.dir or preset.default_dir, preset)


def cmd_data_idx(args: argparse.Namespace) -> int:
    from student_trainer.data.idx import preset_for, write_idx_shards
    from student_trainer.data.templates import load_templates, read_list_file

    preset = preset_for(args.dataset)
    if args.classes and args.classes_file:
        raise ValueError("give the class names once: --classes or --classes-file")
    classes = [name.strip() for name in args.classes.split(",")] if args.classes else None
    if args.classes_file:
        classes = read_list_file(args.classes_file, "classes file")
    summaries = write_idx_shards(args.out, _idx_files(args, preset), dataset=args.dataset, class_names=classes,
                                 templates=load_templates(args.templates),
                                 limits={"train": args.train_limit, "val": args.val_limit}, seed=args.seed,
                                 image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                 image_format=args.image_format)
    _print_splits(summaries, args.out)
    return 0


def cmd_data_folder(args: argparse.Namespace) -> int:
    from student_trainer.data.templates import load_templates
    from student_trainer.data.write_shards import write_folder_shards

    s = write_folder_shards(args.images, args.captions, args.out, split=args.split,
                            max_shard_samples=args.max_shard_samples,
                            max_shard_bytes=args.max_shard_mb * 2**20,
                            templates=load_templates(args.templates))
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
    _add_templates(p, "the digits' own")
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
    _add_templates(p, "those already in the output's dataset.json, else generic CLIP prompts")
    p.set_defaults(func=cmd_data_folder)
    _add_idx_parser(data_sub, fmt)


def _add_templates(p: argparse.ArgumentParser, default: str) -> None:
    """``--templates``, repeatable: the zero-shot templates written to dataset.json."""
    p.add_argument("--templates", action="append", metavar="TEMPLATE_OR_FILE",
                   help="zero-shot template with one '{}' for the class name, or a file of them (one per "
                        f"line); repeat for several; else {default}")


def _add_idx_parser(data_sub, fmt) -> None:
    p = data_sub.add_parser("idx", formatter_class=fmt,
                            help="train/val shards from IDX files (Fashion-MNIST, MNIST, KMNIST, EMNIST)",
                            description="Train/val shards from the MNIST family's IDX files (train-* -> train, "
                                        "t10k-*/test-* -> val; gzipped or not): 28x28 grey images stored as "
                                        "RGB PNG, captions from the data set's caption templates, dataset.json "
                                        "with its class names and zero-shot templates. Default folder: "
                                        "/usr/share/datasets/<dataset> (apt-get install dataset-fashion-mnist).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="which data set, for its class names, templates and file names: fashion-mnist, mnist, "
                        "kmnist or emnist-SPLIT (balanced, byclass, bymerge, digits, letters, mnist)")
    p.add_argument("--dir", help="folder of the IDX files, else /usr/share/datasets/<dataset>")
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            p.add_argument(f"--{split}-{kind}", metavar="FILE",
                           help=f"the {split} split's {kind} file, instead of finding it in --dir "
                                "(naming files writes only the splits named)")
    p.add_argument("--train-limit", type=int, metavar="N",
                   help="write N training samples drawn stratified by class with --seed, else all")
    p.add_argument("--val-limit", type=int, metavar="N", help="the same for the val (test) split")
    p.add_argument("--seed", type=int, default=0, help="subset, order and caption seed")
    p.add_argument("--classes", help="comma-separated class names for labels 0, 1, ..., else the data set's")
    p.add_argument("--classes-file", metavar="FILE", help="class names, one per line, instead of --classes")
    p.add_argument("--image-size", type=int, help="resize to this side, else the files' own (28)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--image-format", choices=["png", "jpg"], default="png", help="image member type")
    _add_templates(p, "the data set's own (Fashion-MNIST: 'a photo of a {}.', ...)")
    p.set_defaults(func=cmd_data_idx)
