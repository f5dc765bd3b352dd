"""Noise families beside the paper's L0 noise: one file per family, each a typed spec (a frozen dataclass of its
parameters) and one numba row kernel on the counter-based generator (:mod:`perturbcore.families._base` says what a
kernel receives). Every family makes one fresh draw per (seed, image, step), so the first-failure protocol, failure
counts, replay and every parallel layout work for all of them unchanged.

A family is written ``name`` or ``name:key=value,key=value`` (:func:`parse`), e.g. ``gaussian:sigma=0.1``;
:meth:`Family.text` gives the canonical spelling back. Adding a family is adding a file here with its kernel and
its class, and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from perturbcore.families._base import Family, PreparedFamily
from perturbcore.families._sweep import LEVELS, Sweep
from perturbcore.families.brightness import Brightness
from perturbcore.families.contrast import Contrast
from perturbcore.families.defocus_blur import DefocusBlur
from perturbcore.families.dihedral import Dihedral
from perturbcore.families.dropout import Dropout
from perturbcore.families.gaussian import Gaussian
from perturbcore.families.gaussian_blur import GaussianBlur
from perturbcore.families.impulse import Impulse
from perturbcore.families.jpeg import Jpeg
from perturbcore.families.l2 import L2
from perturbcore.families.motion_blur import MotionBlur
from perturbcore.families.patch import Patch
from perturbcore.families.pixelate import Pixelate
from perturbcore.families.quantize import Quantize
from perturbcore.families.rotate import Rotate
from perturbcore.families.saturate import Saturate
from perturbcore.families.shot import Shot
from perturbcore.families.speckle import Speckle
from perturbcore.families.translate import Translate
from perturbcore.families.uniform import Uniform

FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (
    Gaussian, Uniform, L2, Shot, Speckle, Impulse, Dropout, Patch, Translate, Dihedral, Rotate,
    GaussianBlur, DefocusBlur, MotionBlur, Brightness, Contrast, Saturate, Pixelate, Jpeg, Quantize)}

__all__ = ["FAMILIES", "LEVELS", "Family", "PreparedFamily", "Sweep", "describe", "markdown_table", "parse", "prepare"]


def _value(family: type[Family], name: str, text: str):
    f = {p.name: p for p in family.parameters()}[name]
    if f.metadata.get("choices") is not None:
        return text
    try:
        return int(text) if f.metadata["whole"] and text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        raise ValueError(f"{family.name}: {name} must be a number; got {text!r}") from None


def parse(text: str) -> Family:
    """A family from its spelling ``name[:key=value[,key=value...]]`` (``ValueError`` naming the problem)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a noise family is written name or name:key=value,... (e.g. gaussian:sigma=0.1); got "
                         f"{text!r}")
    name, colon, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in FAMILIES:
        raise ValueError(f"unknown noise family {name!r}; known: {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    allowed = [p.name for p in family.parameters()]
    values: dict = {}
    for item in (s.strip() for s in rest.split(",")) if rest.strip() else ():
        if not item:
            raise ValueError(f"{name}: an empty parameter in {text!r}; write key=value,key=value")
        key, eq, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not val.strip():
            raise ValueError(f"{name}: parameters are written key=value; got {item!r}")
        if key not in allowed:
            raise ValueError(f"{name} has no parameter {key!r}; its parameters: {', '.join(allowed) or 'none'}")
        if key in values:
            raise ValueError(f"{name}: {key} is given twice")
        values[key] = _value(family, key, val.strip())
    if colon and not values:
        raise ValueError(f"{name}: nothing after ':'; write {name} alone or {name}:key=value")
    return family(**values)


def prepare(family: Family, *, height: int, width: int, channels: int, seed: int, channels_first: bool = False,
            mean=None, std=None, top: float = 1.0, integer: bool = False) -> PreparedFamily:
    """Check ``family`` against the images (``ValueError``) and bind it to their geometry and the model's units:
    ``top`` is the pixel range (1 or 255), ``mean``/``std`` the normalisation (one value per channel)."""
    if not isinstance(family, Family):
        raise ValueError(f"family must be a noise family such as Gaussian(sigma=0.1); got {type(family).__name__}")
    for name, v in (("height", height), ("width", width), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64); got {seed!r}")
    if top not in (1, 255):
        raise ValueError(f"top must be the pixel range, 1 or 255; got {top!r}")
    family.check_image(int(height), int(width), int(channels))
    mean_arr = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(channels)
    std_arr = np.ones(channels, np.float32) if std is None else np.asarray(std, np.float32).reshape(channels)
    return PreparedFamily(family, height=height, width=width, channels=channels, seed=seed,
                          channels_first=channels_first, mean=np.ascontiguousarray(mean_arr),
                          std=np.ascontiguousarray(std_arr), top=top, integer=integer)


def describe() -> list[dict]:
    """Every family with its parameters, for the README's table and ``pyrobust families``."""
    out = []
    for cls in FAMILIES.values():
        params = []
        for f in dataclasses.fields(cls):
            m = f.metadata
            if m.get("choices") is not None:
                rng = " / ".join(m["choices"])
            else:
                rng = f"{'(' if m['lo_open'] else '['}{m['lo']:g}, {m['hi']:g}]" + (" integer" if m["whole"] else "")
            params.append({"name": f.name, "default": f.default, "range": rng, "unit": m.get("unit", ""),
                           "doc": m.get("doc", "")})
        out.append({"name": cls.name, "kind": cls.kind, "summary": cls.summary, "pixelwise": cls.pixelwise,
                    "parameters": params, "example": cls().text()})
    return out


def markdown_table() -> str:
    """The families as the README's table: name, kind, what a step does, parameters (default, range)."""
    lines = ["| family | kind | a step | parameters (default; range) |", "|---|---|---|---|"]
    for r in describe():
        params = "; ".join(f"`{p['name']}` ({p['default']}; {p['range']}{' ' + p['unit'] if p['unit'] else ''})"
                           for p in r["parameters"]) or "none"
        kind = "random" if r["kind"] == "random" else "sweep (5 severities)"
        lines.append(f"| `{r['name']}` | {kind} | {r['summary']} | {params} |")
    return "\n".join(lines) + "\n"
