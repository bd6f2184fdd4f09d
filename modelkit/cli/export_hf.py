"""``modelkit export-hf CHECKPOINT OUT_DIR``: a modelkit checkpoint -> a Hugging Face GPT-2 folder."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export-hf", help="write a modelkit checkpoint as a Hugging Face GPT-2 folder",
                       description="Write model.safetensors and config.json that "
                                   "transformers.GPT2LMHeadModel.from_pretrained opens. Refuses models whose "
                                   "components have no GPT-2 equivalent.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a modelkit checkpoint (.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created if needed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..weights.checkpoint import load_checkpoint, read_checkpoint
    from ..weights.hf import export_hf_gpt2, hf_config_from_spec

    hf_config_from_spec(read_checkpoint(args.checkpoint).spec)  # refuse before loading any weights
    out = export_hf_gpt2(load_checkpoint(args.checkpoint), args.out_dir)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0
