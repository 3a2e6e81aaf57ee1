"""Model presets, the registry of model families, and `from_hf`, the preset of any supported
HF directory. This is the user-facing module recipes import: `presets.qwen3_8b()`,
`presets.intern_s1_mini(...)`, `presets.from_hf(path)`.

Each family's presets live in its package (`jaxtune/models/<family>/presets.py`, the official
HF `config.json` values as ml_collections ConfigDicts) and are re-exported here. Field names
are HF's, so a preset reads like the checkpoint's own config. Any field can be overridden:
`qwen3_8b(num_hidden_layers=16)`. `type` selects the model family.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from ml_collections import ConfigDict

from jaxtune.hf.files import read_hf_config
from jaxtune.models import family
from jaxtune.models import intern_s1 as intern_s1_family
from jaxtune.models import qwen3 as qwen3_family
from jaxtune.models import qwen3_moe as qwen3_moe_family
from jaxtune.models.family import ModelFamily
from jaxtune.models.intern_s1.presets import (intern_s1, intern_s1_mini, intern_s1_tiny,
                                              internvl3_5_1b, internvl3_5_8b,
                                              internvl3_5_30b_a3b)
from jaxtune.models.qwen3.presets import (qwen3_0_6b, qwen3_1_7b, qwen3_4b, qwen3_4b_2507,
                                          qwen3_8b, qwen3_14b, qwen3_32b, qwen3_tiny)
from jaxtune.models.qwen3_moe.presets import (qwen3_30b_a3b, qwen3_235b_a22b,
                                              qwen3_moe_tiny)


class Family(NamedTuple):
  """A registered model family, as `jaxtune.config` reads it.

  module:          the package implementing it (a `jaxtune.models.ModelFamily`);
  defaults:        a preset holding every field of the family: recipes are checked against it;
  hf_model_types:  the `model_type` values of the HF config.json files it reads;
  recipe_only:     fields that are training choices, not architecture: a recipe may set them
                   to anything whatever `load_from`'s config.json says.
  """
  module: str
  defaults: Callable[[], ConfigDict]
  hf_model_types: tuple[str, ...]
  recipe_only: tuple[str, ...] = ()

  @classmethod
  def of(cls, package: ModelFamily) -> Family:
    return cls(package.__name__, package.defaults, tuple(package.HF_MODEL_TYPES),
               tuple(package.RECIPE_ONLY))


# The registered families. A new family is one package (jaxtune/models/<family>/) and one
# entry here.
REGISTERED: tuple[ModelFamily, ...] = (qwen3_family, qwen3_moe_family, intern_s1_family)
# model.type -> family.
FAMILIES: dict[str, Family] = {package.MODEL_TYPE: Family.of(package) for package in REGISTERED}


def from_hf(path: str) -> ConfigDict:
  """The recipe's `model` ConfigDict for the HF model directory `path`, every field read from
  its config.json (nested configs included): `c.model = presets.from_hf(c.load_from)`."""
  hf = read_hf_config(path)
  model_type = hf.get("model_type")
  for name, fam in FAMILIES.items():
    if model_type in fam.hf_model_types:
      cfg = family(name).config_from_hf(hf, path if os.path.isdir(path)
                                        else os.path.dirname(path))
      assert cfg.type == name, (cfg.type, name)
      return cfg
  known = sorted(t for fam in FAMILIES.values() for t in fam.hf_model_types)
  raise ValueError(f"{path}/config.json has model_type {model_type!r}; jaxtune reads {known}")


__all__ = ["FAMILIES", "REGISTERED", "Family", "from_hf", "intern_s1", "intern_s1_mini",
           "intern_s1_tiny", "internvl3_5_1b", "internvl3_5_30b_a3b", "internvl3_5_8b",
           "qwen3_0_6b", "qwen3_14b", "qwen3_1_7b", "qwen3_235b_a22b", "qwen3_30b_a3b",
           "qwen3_32b", "qwen3_4b", "qwen3_4b_2507", "qwen3_8b", "qwen3_moe_tiny", "qwen3_tiny",
           "read_hf_config"]
