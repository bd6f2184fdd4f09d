"""``modelkit import-hf DIR OUT``: a Hugging Face folder (GPT-2, Llama) -> a modelkit checkpoint."""

from __future__ import annotations

import argparse
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("import-hf", help="convert a Hugging Face folder (GPT-2, Llama) to a modelkit checkpoint",
                       description="Read a Hugging Face folder (config.json with model.safetensors or "
                                   "pytorch_model.bin; model_type gpt2 or llama) and write a "
                                   "modelkit checkpoint (safetensors with the resolved spec). The folder's "
                                   "tokenizer.json, if any, is stored in the checkpoint, which `modelkit "
                                   "generate --checkpoint` then uses; a GPT-2 folder without one records "
                                   "GPT-2's built-in tokenizer.")
    p.add_argument("folder", metavar="DIR", help="the Hugging Face model folder")
    p.add_argument("output", metavar="OUT", help="the modelkit checkpoint to write (.safetensors)")
    p.add_argument("--spec", help="a spec to use instead of the folder's config.json "
                                  "(e.g. configs/pretrained/gpt2.json)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="convert the weights (default: as stored)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..weights.checkpoint import read_checkpoint
    from ..weights.hf_families import import_hf
    from ..introspect import count_parameters

    model = import_hf(args.folder, args.output, spec=args.spec, dtype=DTYPES[args.dtype] if args.dtype else None)
    count = count_parameters(model)
    record = read_checkpoint(args.output).tokenizer
    tokenizer = {"gpt2": "GPT-2's tokenizer", "none": "no tokenizer (the folder has no tokenizer.json)",
                 "tokenizer.json": "its tokenizer.json stored"}[record.type]
    print(f"wrote {args.output}: '{model.spec.name}', {count.total:,} parameters "
          f"({model.tok_emb.weight.dtype}), {tokenizer}, from {args.folder}")
    return 0
