"""The networks: SD loading and checkpoint formats, LoRA, the PFG adapter, text encoding and image encoders."""
