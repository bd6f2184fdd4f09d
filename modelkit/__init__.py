"""modelkit: GPT-style language models from JSON specs, built out of registered components.

The small public API::

    from modelkit import load_spec, build_model, GPTModel, SpecError, count_parameters, register

Every exception modelkit raises on purpose derives from :class:`ModelkitError`.
"""

from .runtime.cpu import apply_forced_capability

apply_forced_capability()  # MODELKIT_CPU_CAPABILITY: before any kernel runs (see modelkit.runtime.cpu)

from .builder import build_model  # noqa: E402
from .weights.checkpoint import load_book_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .errors import CheckpointError, GenerationError, ModelkitError, PluginError, RegistryError, SpecError
from .generation import generate, stream_generate
from .weights.hf import export_hf_gpt2, load_hf_gpt2
from .weights.hf_families import export_hf, load_hf
from .introspect import count_parameters
from .model import GPTModel
from .registry import KINDS, SubComponent, get_registry, register, registries
from .spec import ComponentSpec, ModelSpec, load_spec
from .version import __version__


__all__ = [
    "KINDS", "CheckpointError", "ComponentSpec", "GPTModel", "GenerationError", "ModelSpec", "ModelkitError",
    "PluginError", "RegistryError", "SpecError", "SubComponent", "build_model", "count_parameters", "get_registry",
    "load_spec", "register", "registries", "__version__",
    "generate", "stream_generate",
    "save_checkpoint", "load_checkpoint", "read_checkpoint", "load_book_checkpoint", "load_hf_gpt2", "export_hf_gpt2",
    "load_hf", "export_hf",
]
