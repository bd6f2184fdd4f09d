"""The ceilings modelkit puts on specs and the JSON they come in: one documented contract.

Every size a spec (or a built-in component) can state has a ceiling far above any published model
and far below what would hang or crash the machine; validation refuses a larger value at its JSON
path and names the limit, before anything is built. ``modelkit schema`` shows each as ``maximum``.

========================  ===================  ==================================================
name                      value                what it bounds
========================  ===================  ==================================================
MAX_VOCAB_SIZE            2**24 = 16,777,216   ``vocab_size`` (largest published: ~256k)
MAX_CONTEXT_LENGTH        2**24 = 16,777,216   ``context_length``
MAX_EMB_DIM               2**20 = 1,048,576    ``emb_dim`` (largest published: ~25k)
MAX_N_HEADS               2**16 = 65,536       ``n_heads`` (and llama's ``num_kv_heads``)
MAX_N_LAYERS              1,024                ``n_layers``; deepest published: ~1,000. A meta
                                               build (``modelkit info``) of 1,024 blocks takes
                                               about a second
MAX_HIDDEN_DIM            2**24 = 16,777,216   feed-forward ``hidden_dim`` (mlp, swiglu)
MAX_HIDDEN_MULT           256                  mlp ``hidden_mult``
MAX_MULTIPLE_OF           2**16 = 65,536       swiglu ``multiple_of``
MAX_PARAMETERS            10**12               parameters of the whole model, counted exactly
                                               from a meta build of one block (see
                                               :mod:`modelkit.sizing`)
MAX_SPEC_BYTES            4 MiB = 4,194,304    a spec file's size in bytes, or a JSON spec text's
                                               length in characters (specs are ~1 kB)
MAX_JSON_DEPTH            64                   nesting of arrays and objects in a spec (specs
                                               nest ~4 deep)
MAX_TOKENIZER_BYTES       40 MiB = 41,943,040  a Hugging Face ``tokenizer.json`` (largest published:
                                               ~33 MB; Llama 3's ~9 MB). Twice this, its worst
                                               case escaped as JSON text, stays under the 100 MB
                                               header safetensors reads, where checkpoints keep it
========================  ===================  ==================================================

This module imports nothing, so every part of the core (and a plugin) can use the same figures.
"""

from __future__ import annotations

MAX_VOCAB_SIZE = 2**24
MAX_CONTEXT_LENGTH = 2**24
MAX_EMB_DIM = 2**20
MAX_N_HEADS = 2**16
MAX_N_LAYERS = 1_024
MAX_HIDDEN_DIM = 2**24
MAX_HIDDEN_MULT = 256
MAX_MULTIPLE_OF = 2**16
MAX_PARAMETERS = 10**12
MAX_SPEC_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 64
MAX_TOKENIZER_BYTES = 40 * 2**20
