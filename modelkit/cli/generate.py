"""``modelkit generate``: extend a prompt with a model and stream the text to stdout as it is made."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import torch
from torch import Tensor

from ..builder import build_model
from ..devices import DEVICE_HELP, resolve_device
from ..errors import CheckpointError, GenerationError
from ..generation import check_sampling_args, check_seed, stream_generate
from ..model import GPTModel
from ..runtime.onednn import onednn_linear_available
from ..spec import load_spec
from ..hf_tokenizer import incremental_decoder
from ..tokenizer import get_tokenizer, text_to_token_ids

DEFAULT_SEED = 123


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="generate text from a prompt (streams to stdout)",
        description="Extend --prompt with a model and print the text as it is generated. Without "
                    "--checkpoint the model is built from --config with random weights "
                    "(torch.manual_seed(SEED) first, as in the book). Sampling uses torch's global RNG "
                    "reseeded with SEED just before generating, so the tokens are those of the book's "
                    "code after torch.manual_seed(SEED).")
    p.add_argument("--config", metavar="CONFIG", help="a JSON spec file (required without --checkpoint)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="trained weights: a modelkit checkpoint (its own spec is used; --config, if "
                        "given, must describe the same model), a folder holding one as model.safetensors "
                        "(a `modelkit train` run or one of its checkpoints), or the book's "
                        "torch.save(state_dict) file with --config naming its spec")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="a Hugging Face tokenizer.json, or 'gpt2' for the built-in GPT-2 tokenizer (default: the "
                        "one the checkpoint records; GPT-2's without --checkpoint, for the book's files and for "
                        "checkpoints written before modelkit recorded tokenizers)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, metavar="N", help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (default); higher = more random")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample among the most likely tokens whose probability reaches P (nucleus)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S",
                   help=f"seed for the random weights and for sampling (default {DEFAULT_SEED})")
    p.add_argument("--device", default="auto", help=DEVICE_HELP + "; the model and the prompt go there first, "
                   "then the speed options apply (oneDNN, --native and huge pages are the CPU's)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window at every step")
    p.add_argument("--eos", action="store_true",
                   help="stop at the tokenizer's end-of-text token (GPT-2's <|endoftext|>; a tokenizer.json's is "
                        "the eos_token_id of the imported config.json), not printed")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations dtype (bfloat16: half the weight memory; fast on CPUs with "
                        "oneDNN bfloat16 kernels (AVX-512, AMX), slower than float32 elsewhere: see "
                        "modelkit info --device; logits differ by a few 1e-2)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: weight-only int8 Linear layers (fewest bytes per token, fastest CPU decoding; "
                        "see modelkit.runtime.quantize)")
    p.add_argument("--huge-pages", action="store_true",
                   help="move the weights to 2 MiB pages first (Linux): a one-off copy that makes each decoded "
                        "token cheaper, so it pays for long generations (see modelkit.runtime.hugepages)")
    p.add_argument("--native", action="store_true",
                   help="decode with the native (C++) step: GPT-2's composition only, the same tokens without "
                        "the Python between the kernels; compiled on first use (needs a C++ compiler and ninja: "
                        "pip install 'modelkit[native]'), then cached (see modelkit.runtime.native)")
    p.set_defaults(func=run)


def load_checkpoint_model(path: str, config: str | None) -> GPTModel:
    """The model saved in ``path``: a modelkit checkpoint (its own spec), or, with ``config``, the
    book's ``torch.save(model.state_dict())`` file loaded into that spec (:mod:`modelkit.weights.checkpoint`)."""
    from ..weights import checkpoint

    if config is not None and not checkpoint.is_checkpoint_file(path):
        return checkpoint.load_book_checkpoint(path, config)
    model = checkpoint.load_checkpoint(path)
    if config is not None:
        check_same_spec(model, config, path)
    return model


def check_same_spec(model: GPTModel, config: str, checkpoint: str) -> None:
    """Raise :class:`CheckpointError` if ``config`` describes another model than the checkpoint's spec.

    The name is ignored; every size and component (with its parameters) must match.
    """
    ours = load_spec(config).model_dump(exclude={"name"})
    theirs = model.spec.model_dump(exclude={"name"})
    differ = [key for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    if differ:
        details = "; ".join(f"{key}: checkpoint {theirs.get(key)!r}, config {ours.get(key)!r}" for key in differ)
        raise CheckpointError(
            f"{checkpoint} was saved with another spec than {config} ({details}); "
            "omit --config to use the checkpoint's own spec"
        )


def checkpoint_file(path: str) -> str:
    """``path``, or for a folder (a training run, or one of its checkpoints) its ``model.safetensors``.
    Raises :class:`CheckpointError` when there is no such file."""
    if os.path.isdir(path):
        inside = os.path.join(path, "model.safetensors")
        if not os.path.isfile(inside):
            raise CheckpointError(f"checkpoint folder {path} holds no model.safetensors "
                                  "(give a checkpoint file, a training run or one of its checkpoints)")
        return inside
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    return path


def load_model(args: argparse.Namespace) -> GPTModel:
    """The model to generate with, in eval mode: from the checkpoint, or seeded random weights."""
    if args.checkpoint is not None:
        model = load_checkpoint_model(checkpoint_file(args.checkpoint), args.config)
    else:
        spec = load_spec(args.config)
        torch.manual_seed(args.seed)
        model = build_model(spec)
        print(f"note: no --checkpoint: the weights are untrained (random, seed {args.seed}), "
              "so the text is gibberish", file=sys.stderr)
    return model.eval()


def load_tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer to generate with: ``--tokenizer`` (``gpt2`` or a tokenizer.json file) if given,
    else the one a modelkit checkpoint records (:func:`~modelkit.weights.checkpoint.checkpoint_tokenizer`),
    else GPT-2's (random weights, the book's ``torch.save`` files). Raises :class:`GenerationError` when
    the checkpoint records none (a folder imported without a tokenizer.json)."""
    from ..hf_tokenizer import HFTokenizer
    from ..weights import checkpoint

    if args.tokenizer is not None:
        return get_tokenizer() if args.tokenizer == "gpt2" else HFTokenizer.from_file(args.tokenizer)
    if args.checkpoint is None:
        return get_tokenizer()
    path = checkpoint_file(args.checkpoint)
    if args.config is not None and not checkpoint.is_checkpoint_file(path):
        return get_tokenizer()
    tokenizer = checkpoint.checkpoint_tokenizer(path)
    if tokenizer is None:
        raise GenerationError(f"{args.checkpoint} records no tokenizer (it was imported from a folder without "
                              "tokenizer.json); give --tokenizer FILE (a tokenizer.json, or gpt2)")
    return tokenizer


def run(args: argparse.Namespace) -> int:
    if args.config is None and args.checkpoint is None:
        raise GenerationError("give --config CONFIG (random weights) or --checkpoint FILE (trained weights)")
    if args.prompt == "":
        raise GenerationError("the prompt is empty; give some text with --prompt")
    if args.max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {args.max_new_tokens}")
    check_sampling_args(args.temperature, args.top_k, args.top_p)  # before building anything
    check_seed(args.seed)
    cpu_only = args.native or args.huge_pages  # options of the CPU: "auto" then means the CPU
    device = resolve_device("cpu" if args.device == "auto" and cpu_only else args.device)
    model = load_model(args).to(device)
    tokenizer = load_tokenizer(args)
    from ..runtime.native import NativeBuildError, NativeUnsupportedError
    from ..runtime.optimize import optimize_for_inference  # dtype, int8, and the decode-friendly weight layout

    try:
        model = optimize_for_inference(model, dtype=args.dtype, quantize=args.quantize, huge_pages=args.huge_pages,
                                       native=args.native)
    except (NativeBuildError, NativeUnsupportedError) as exc:  # only --native raises these
        raise GenerationError(f"--native: {exc}") from None
    if args.dtype == "bfloat16" and device.type == "cpu" and not onednn_linear_available(torch.bfloat16):
        print("note: this CPU has no oneDNN bfloat16 kernels (AVX-512, AVX2-VNNI-2 or AMX): bfloat16 runs on "
              "PyTorch's generic kernels, slower than float32 (modelkit info --device)", file=sys.stderr)
    if model.spec.vocab_size < tokenizer.n_vocab:
        name = "GPT-2 tokenizer's" if tokenizer is get_tokenizer() else f"tokenizer's ({tokenizer.source})"
        raise GenerationError(
            f"the model has vocab_size {model.spec.vocab_size}, fewer than the {name} "
            f"{tokenizer.n_vocab} tokens; generating text needs vocab_size >= {tokenizer.n_vocab}"
        )
    if args.eos and tokenizer.eot_token is None:
        raise GenerationError(f"--eos: the tokenizer ({tokenizer.source}) has no end-of-text id (a checkpoint takes "
                              "it from config.json's eos_token_id at import; a --tokenizer file has none); "
                              "generate without --eos")
    idx = text_to_token_ids(args.prompt, tokenizer).to(device)
    eos_id = tokenizer.eot_token if args.eos else None
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    torch.manual_seed(args.seed)
    with warnings.catch_warnings(record=True) as caught:  # e.g. the prompt is cropped: say it in one line
        warnings.simplefilter("always")
        steps = stream_generate(model, idx, args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, use_cache=not args.no_cache)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    _stream_text(steps, incremental_decoder(tokenizer, idx[0].tolist()), tokenizer.n_vocab, eos_id, out)
    return 0


def _stream_text(steps: Iterator[Tensor], decoder: Any, n_vocab: int, eos_id: int | None, out: TextIO) -> None:
    """Write each generated token's text (by ``decoder``, which continues the prompt's) to ``out`` as it
    comes (stopping at ``eos_id``), then a newline; ids from ``n_vocab`` up have no text (U+FFFD).

    A warning raised while decoding (e.g. greedy decoding of non-finite logits) is printed as one
    ``warning: ...`` line on stderr, as it happens; a :class:`GenerationError` (e.g. sampling from
    non-finite logits) ends the text's line and propagates.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _warning_line
        try:
            for token in steps:
                token_id = int(token[0, 0])
                if token_id == eos_id:
                    break
                # ids past the tokenizer's (a padded vocabulary) have no text
                text = decoder.feed(token_id) if token_id < n_vocab else "\ufffd"
                if text:
                    out.write(text)
                    out.flush()
        except GenerationError:
            out.write("\n")  # end the text's line; the error follows on stderr
            out.flush()
            raise
    out.write(decoder.flush() + "\n")
    out.flush()


def _warning_line(message: Warning | str, *_: Any, **__: Any) -> None:
    """Print a warning as one ``warning: ...`` line on stderr (``warnings.showwarning``'s signature)."""
    print(f"warning: {message}", file=sys.stderr)
