"""Bundled offline models: definitions and the recipes that train them.

Each recipe renders or reads its own data (nothing is downloaded), trains on CPU and
writes a standard diffusers / transformers folder under ``assets/``, loaded at run time
by the same ``from_pretrained`` code path as a hub model.
"""
