"""Stage 2: train a video DiT on a cache with flow matching plus CREPA; only the transformer is loaded."""
