"""Feature names per data type.

WineRecord's eleven fields carry the names the tutorial's PMML models use (with spaces), so
one record serves PMML (by name) and vector models (by position) alike.
"""
from __future__ import annotations

WINE_DATA_TYPE = "wine"

#: WineRecord fields 1..11, in field-number order, under their PMML names.
WINE_FEATURES: tuple[str, ...] = (
    "fixed acidity",
    "volatile acidity",
    "citric acid",
    "residual sugar",
    "chlorides",
    "free sulfur dioxide",
    "total sulfur dioxide",
    "density",
    "pH",
    "sulphates",
    "alcohol",
)

#: WineRecord protobuf field names, aligned with WINE_FEATURES.
WINE_PROTO_FIELDS: tuple[str, ...] = (
    "fixed_acidity",
    "volatile_acidity",
    "citric_acid",
    "residual_sugar",
    "chlorides",
    "free_sulfur_dioxide",
    "total_sulfur_dioxide",
    "density",
    "pH",
    "sulphates",
    "alcohol",
)


def canonical_features(data_type: str) -> tuple[str, ...]:
    """The input order a vector model gets when its descriptor lists no ``inputFeatures``."""
    return WINE_FEATURES if data_type == WINE_DATA_TYPE else ()
