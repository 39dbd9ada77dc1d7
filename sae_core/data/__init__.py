"""Activation data: file formats, activation sets, checks, the rank data order, read-ahead, toy sets.

Everything but `prefetch` and `toy` is numpy only, so the submission gate and the pages can check a
dataset without loading torch. Import from the modules (`sae_core.data.checks`, ...).
"""
