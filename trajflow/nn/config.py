"""Models built from one config dataclass, saved and rebuilt through it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar

from ..checkpoint import Pretrained, dataclass_from_dict

__all__ = ["DataclassPretrained"]


class DataclassPretrained(Pretrained):
    """:class:`~trajflow.checkpoint.Pretrained` for a model ``cls(config)`` whose ``config`` is a dataclass of
    class :attr:`config_class`: its fields are what :meth:`save_pretrained` writes."""

    config: Any
    #: The dataclass of :attr:`config`.
    config_class: ClassVar[type]

    def config_dict(self) -> dict[str, Any]:
        """The fields of :attr:`config`."""
        return asdict(self.config)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Any:
        return cls(dataclass_from_dict(cls.config_class, config, "config"))  # type: ignore[call-arg]
