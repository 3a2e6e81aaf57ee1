"""jaxtune: XTuner v1's Trainer rebuilt on JAX/Flax NNX."""

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy so `import jaxtune.config` stays light (no JAX start-up) for config tooling.
  if name == "Trainer":
    from jaxtune.train.trainer import Trainer  # pylint: disable=import-outside-toplevel
    return Trainer
  raise AttributeError(name)


__all__ = ["Trainer", "__version__"]
