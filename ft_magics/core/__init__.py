"""The training and inference core: torch/transformers/peft/bitsandbytes, no IPython, no widgets."""
