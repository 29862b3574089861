"""CREPA: cross-frame representation alignment for video DiTs, with a precomputed teacher."""

__version__ = "0.1.0"
