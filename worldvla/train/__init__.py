"""Training: the WorldVLA trainer (`trainer.py`, single process or torchrun + FSDP2), the VQGAN
trainer (`vq.py`), exact-resume checkpoints (`checkpointing.py`) and process-group helpers
(`distributed.py`). Modules are imported on use; nothing heavy happens here."""
