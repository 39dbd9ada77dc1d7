"""Activation data: file formats, manifests, activation sets, checks, the block-shuffled order, the loader, toy sets.

Everything but `loader` and `toy` is numpy only, so the submission gate and the pages can check a
dataset without loading torch. Import from the modules (`sae_core.data.checks`, ...).
"""
