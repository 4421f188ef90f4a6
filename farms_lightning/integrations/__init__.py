"""Integrations with other training loops; each needs its own optional extra and is imported on use.

* :mod:`farms_lightning.integrations.transformers`: ``FARMSTrainerCallback`` for Hugging Face
  ``transformers.Trainer`` (``pip install 'farms_lightning[transformers]'``).
"""
