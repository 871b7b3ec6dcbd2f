"""Optional glue between minorsft's fused losses and other training frameworks.

``minorsft.integrations.hf`` holds every Hugging Face hook (``transformers.Trainer``
and TRL's ``DPOTrainer``); nothing else in the package imports it.
"""
