"""Model families: everything that differs between SD1.x, SD2.x and SDXL, in one object per
family that every stage asks (text encoding, extra UNet inputs, checkpoint layout, LoRA names,
pipelines, metadata names). A new family (the next anime base model) is one new file here and
one line in FAMILIES."""
from __future__ import annotations

from library.models.families.base import ModelFamily
from library.models.families.sd import SD1, SD2
from library.models.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SD2, SDXL)}


def family_named(name: str) -> ModelFamily:
    return FAMILIES[name]


def family_of_unet(unet) -> ModelFamily:
    """The family a diffusers UNet belongs to, from its config alone (for code handed only a UNet,
    such as LoRA naming): SDXL's UNet takes text_time conditioning, SD2's projects its
    transformer blocks with Linear layers where SD1's use 1x1 convs."""
    config = getattr(unet, "config", None)
    for family in FAMILIES.values():
        if family.owns_unet_config(config):
            return family
    return SD1


__all__ = ["FAMILIES", "ModelFamily", "SD1", "SD2", "SDXL", "family_named", "family_of_unet"]
