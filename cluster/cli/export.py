"""`kd export`: a student checkpoint as open_clip's own model folder (`student_trainer.export`)."""
from __future__ import annotations

import argparse

DESCRIPTION = ("Write a student checkpoint as open_clip's own folder (open_clip_config.json with the whole model "
               "config and the preprocessing kd eval uses, open_clip_model.safetensors, a README.md model card), "
               "which a process with only open_clip installed loads with create_model_and_transforms('local-dir:DIR') "
               "and get_tokenizer('local-dir:DIR'). Written to a temporary folder beside --out and renamed when complete.")


def cmd_export(args: argparse.Namespace) -> int:
    from student_trainer.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    print(f"wrote {out}: open_clip.create_model_and_transforms('local-dir:{out}'), "
          f"open_clip.get_tokenizer('local-dir:{out}')")
    return 0


def add_parser(sub, fmt) -> None:
    p = sub.add_parser("export", formatter_class=fmt, help="a student checkpoint as an open_clip model folder",
                       description=DESCRIPTION)
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="student checkpoint folder (model.pt + model_config.json), e.g. runs/<run>/checkpoint_...")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder (once the new one is complete)")
    p.set_defaults(func=cmd_export)
