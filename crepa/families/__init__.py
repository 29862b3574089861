"""Registry of model-family adapters, looked up by the short name users pass as --family."""

from __future__ import annotations

from crepa.errors import UserError
from crepa.families.base import Conditioning, FamilyAdapter
from crepa.families.kandinsky5_video import Kandinsky5VideoAdapter
from crepa.families.ltxvideo import LTXVideoAdapter
from crepa.families.sanavideo import SanaVideoAdapter
from crepa.families.wan import WanAdapter

_ADAPTERS: dict[str, type[FamilyAdapter]] = {
    WanAdapter.name: WanAdapter,
    LTXVideoAdapter.name: LTXVideoAdapter,
    SanaVideoAdapter.name: SanaVideoAdapter,
    Kandinsky5VideoAdapter.name: Kandinsky5VideoAdapter,
}
SUPPORTED_FAMILIES = tuple(_ADAPTERS)


def get_family(name: str) -> FamilyAdapter:
    """The adapter for `name`, or an error that lists the supported families."""
    try:
        return _ADAPTERS[name]()
    except KeyError:
        raise UserError(
            f"unsupported model family {name!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        ) from None


__all__ = ["Conditioning", "FamilyAdapter", "SUPPORTED_FAMILIES", "get_family"]
