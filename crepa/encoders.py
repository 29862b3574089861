"""Short names of the vision encoders the teacher features come from."""

from __future__ import annotations

ENCODER_ALIASES = {
    f"dinov2_vit{size}14{suffix}": f"facebook/dinov2-{registers}{name}"
    for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for suffix, registers in (("", ""), ("_reg", "with-registers-"))
}


def resolve_encoder(name: str) -> str:
    """Hub id or folder for a short encoder name; anything else passes through."""
    return ENCODER_ALIASES.get(name, name)
