"""Weights in and out: modelkit checkpoints (:mod:`.checkpoint`) and Hugging Face folders, GPT-2
(:mod:`.hf`) and every family by ``model_type`` (:mod:`.hf_families`: ``gpt2``, ``llama``). Both
read data only (safetensors, JSON, ``torch.load(weights_only=True)``): a file never names code to
import."""
