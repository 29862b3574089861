"""Stage 1: decode clips, encode them once (VAE latents, vision-encoder teacher, text), write the cache.

Kept empty on purpose: decode worker processes import this package and must stay light.
"""
