"""Typed configuration: dataclass sections loaded from YAML (ours or AF1's dialect), validated field
by field; every error names the field and the file.

* :mod:`.schema`: the root :class:`Config` and its sections (``model`` is
  :class:`megaflamingo.model.config.ModelConfig`).
* :mod:`.loader`: :func:`load_config` (YAML, AF1 dialect, ``key=value`` overrides, placeholders).
* :mod:`.validate`: cross-field rules.
"""
from megaflamingo.errors import ConfigError

from .loader import (apply_override, from_dict, is_af1_dialect, load_config, read_yaml,
                     substitute_placeholders)
from .schema import (AudioTransformerConfig, Config, DataConfig, DatasetEntry, DeepSpeedSection, EncoderConfig,
                     ModelConfig, TrainConfig, XattnConfig)
from .validate import validate

__all__ = [
    "AudioTransformerConfig", "Config", "ConfigError", "DataConfig", "DatasetEntry", "DeepSpeedSection",
    "EncoderConfig", "ModelConfig", "TrainConfig", "XattnConfig", "apply_override", "from_dict", "is_af1_dialect",
    "load_config", "read_yaml", "substitute_placeholders", "validate",
]
