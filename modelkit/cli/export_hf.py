"""``modelkit export-hf CHECKPOINT OUT_DIR [--model-type T]``: a modelkit checkpoint -> a Hugging Face folder."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("export-hf", help="write a modelkit checkpoint as a Hugging Face folder (GPT-2, Llama, ...)",
                       description="Write model.safetensors and config.json that "
                                   "transformers.AutoModelForCausalLM.from_pretrained opens, as the first family "
                                   "(gpt2, llama, qwen2, opt, gpt_neox, mistral, phi3, phi) whose config can state "
                                   "the model's parts, or as --model-type, and tokenizer.json when the checkpoint "
                                   "stores one. Refuses models whose components have no equivalent in the family.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a modelkit checkpoint (.safetensors)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (created if needed)")
    p.add_argument("--model-type", default=None, metavar="MODEL_TYPE",
                   help="write this Hugging Face model_type (e.g. phi3 for Llama's parts without biases); "
                        "default: the first family whose config can state the model's parts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..weights.checkpoint import load_checkpoint, read_checkpoint, stored_tokenizer_file
    from ..weights.hf_families import export_family_of, export_hf

    info = read_checkpoint(args.checkpoint)
    export_family_of(info.spec, args.model_type)  # refuse before loading any weights
    tokenizer_json = stored_tokenizer_file(info)  # checked against its recorded sha256
    out = export_hf(load_checkpoint(args.checkpoint), args.out_dir, model_type=args.model_type,
                    tokenizer_json=tokenizer_json)
    written = ["model.safetensors", "config.json"] + (["tokenizer.json"] if tokenizer_json is not None else [])
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0
