"""Weights in and out: modelkit checkpoints (:mod:`.checkpoint`) and Hugging Face GPT-2 weights
(:mod:`.hf`). Both read data only (safetensors, JSON, ``torch.load(weights_only=True)``): a file
never names code to import."""
