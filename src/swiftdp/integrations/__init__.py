"""Integrations with training frameworks (optional extras).

``swiftdp.integrations.trainer.DPTrainer``: ``transformers.Trainer`` with DP-SGD
(needs the ``[hf]`` extra; imported from its module so that ``swiftdp``
itself never imports ``transformers``).
"""
