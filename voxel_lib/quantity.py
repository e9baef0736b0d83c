"""Numbers that carry their unit.

A :class:`Quantity` is a ``float`` with a ``unit`` and an optional ``name``; it prints as
``1234.5 mm³`` and converts between compatible units with :meth:`Quantity.to`.
Arithmetic on it gives plain floats (the unit is not guessed through arithmetic).
"""

from __future__ import annotations

# unit -> (dimension, factor to the dimension's base unit)
_UNITS = {
    "mm": ("length", 1.0),
    "cm": ("length", 10.0),
    "m": ("length", 1000.0),
    "mm³": ("volume", 1.0),
    "mm3": ("volume", 1.0),
    "cm³": ("volume", 1000.0),
    "cm3": ("volume", 1000.0),
    "mL": ("volume", 1000.0),
    "ml": ("volume", 1000.0),
    "L": ("volume", 1e6),
    "mm²": ("area", 1.0),
    "%": ("percent", 1.0),
    "a.u.": ("intensity", 1.0),
    "HU": ("density", 1.0),
    "1": ("ratio", 1.0),
    "days": ("time", 1.0),
    "years": ("time", 365.25),
    "mm³/year": ("volume_rate", 1.0),
    "mL/year": ("volume_rate", 1000.0),
    "mm/year": ("length_rate", 1.0),
    "%/year": ("percent_rate", 1.0),
    "a.u./year": ("intensity_rate", 1.0),
    "HU/year": ("density_rate", 1.0),
}


class Quantity(float):
    """A float with a unit, e.g. ``Quantity(1500.0, "mm³", name="volume")``.

    Args:
        value: the number.
        unit: its unit ("mm", "mm³", "mL", "%", "a.u.", "HU", ...).
        name: what it measures (optional).
    """

    def __new__(cls, value, unit: str, name: str | None = None):
        obj = super().__new__(cls, float(value))
        obj.unit = unit
        obj.name = name
        return obj

    @property
    def value(self) -> float:
        """The number as a plain float."""
        return float(self)

    def to(self, unit: str) -> "Quantity":
        """Converts to a compatible unit (mm³ <-> mL <-> cm³, mm <-> cm, ...)."""
        if unit == self.unit:
            return self
        try:
            dim_a, fa = _UNITS[self.unit]
            dim_b, fb = _UNITS[unit]
        except KeyError as exc:
            raise ValueError(f"unknown unit {exc.args[0]!r}; known: {sorted(_UNITS)}") from None
        if dim_a != dim_b:
            raise ValueError(f"cannot convert {self.unit} ({dim_a}) to {unit} ({dim_b})")
        return Quantity(float(self) * fa / fb, unit, self.name)

    def as_dict(self) -> dict:
        """``{"name", "value", "unit"}`` for JSON output."""
        return {"name": self.name, "value": float(self), "unit": self.unit}

    def __repr__(self) -> str:
        return f"{float(self):.6g}" if self.unit == "1" else f"{float(self):.6g} {self.unit}"

    def __str__(self) -> str:
        v = float(self)
        text = f"{v:.2f}" if 0.01 <= abs(v) < 1e6 else f"{v:.4g}"
        return text if self.unit == "1" else f"{text} {self.unit}"

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(self)
        return format(float(self), spec)

    def __reduce__(self):
        return (Quantity, (float(self), self.unit, self.name))
