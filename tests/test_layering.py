"""Import layering: no module under jaxtune/ imports from a layer above its own.

The layers, low to high (a module may import its own layer and any layer below it):

  parallel < ops < data < hf < models < config < train, launch < top

`top` holds the entry points and the public surface: jaxtune.plan, jaxtune.main, jaxtune.cli,
jaxtune.plot, jaxtune.recipes, the package's own `jaxtune/__init__.py` (its lazy `Trainer`) and
every `__main__.py`, wherever it lives (`python -m jaxtune.data` is an entry point, not data).

The check reads the source with `ast` and imports nothing. It sees every import statement in a
module, including those inside functions, methods, `try` and `if TYPE_CHECKING:` blocks (a
function-level import is how an upward dependency hides from a top-of-file reading), and
`importlib.import_module("...")` / `__import__("...")` calls with a literal name. Relative
imports, `from jaxtune import models` (a submodule named in a from-import) and
`import jaxtune.x.y` are resolved to the module they load. A module that matches no layer fails
the test too: give a new top-level module or package its layer in LAYERS.
"""

import ast
import os
import textwrap
from typing import NamedTuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "jaxtune"

# (layer name, module prefixes), low to high. A prefix matches the module itself and everything
# under it, except the bare package name, which is jaxtune/__init__.py only; the most specific
# (longest) prefix wins.
LAYERS = (
    ("parallel", ("jaxtune.parallel",)),
    ("ops", ("jaxtune.ops",)),
    ("data", ("jaxtune.data",)),
    ("hf", ("jaxtune.hf",)),
    ("models", ("jaxtune.models",)),
    ("config", ("jaxtune.config",)),
    ("train", ("jaxtune.train", "jaxtune.launch")),
    ("top", ("jaxtune", "jaxtune.plan", "jaxtune.main", "jaxtune.cli", "jaxtune.plot",
             "jaxtune.recipes")),
)
TOP = len(LAYERS) - 1
ORDER = " < ".join("/".join(p.split(".")[-1] for p in prefixes) if name != "top" else "top"
                   for name, prefixes in LAYERS)


class Import(NamedTuple):
  path: str        # the importing file, relative to the directory holding the package
  line: int
  importer: str    # its module name
  imported: str    # the module the statement loads
  in_function: bool


class Violation(NamedTuple):
  imp: Import
  importer_layer: int
  imported_layer: int | None   # None: the imported module matches no layer

  def __str__(self):
    i = self.imp
    where = " (inside a function)" if i.in_function else ""
    if self.imported_layer is None:
      return (f"{i.path}:{i.line}: imports {i.imported}{where}, which is in no layer: give it a "
              f"layer in LAYERS (tests/test_layering.py)")
    low, high = LAYERS[self.importer_layer][0], LAYERS[self.imported_layer][0]
    return (f"{i.path}:{i.line}: {i.importer} (layer '{low}') imports {i.imported} "
            f"(layer '{high}', above it){where}. Fix: move what it needs down into layer "
            f"'{low}' or below, or move this code up to '{high}', or have the caller pass the "
            f"object in")


def layer_of(module: str, layers=LAYERS) -> int | None:
  """The index of `module`'s layer (every `__main__` is the top layer); None if none matches."""
  if module.split(".")[-1] == "__main__":
    return len(layers) - 1
  best, best_len = None, -1
  for index, (_, prefixes) in enumerate(layers):
    for prefix in prefixes:
      # The package's own name ("jaxtune") is its __init__ only, not everything under it.
      under = "." in prefix and module.startswith(prefix + ".")
      if (module == prefix or under) and len(prefix) > best_len:
        best, best_len = index, len(prefix)
  return best


def _modules(root: str, package: str) -> dict[str, str]:
  """Module name -> file path for every .py file of the package under `root`."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(os.path.join(root, package)):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
    for filename in sorted(filenames):
      if not filename.endswith(".py"):
        continue
      path = os.path.join(dirpath, filename)
      parts = os.path.relpath(path, root)[:-len(".py")].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def _imports(module: str, path: str, root: str, package: str, known: set[str]) -> list[Import]:
  """Every import of the package that `module` (the file at `path`) makes, at any depth."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  is_package = os.path.basename(path) == "__init__.py"
  rel = os.path.relpath(path, root)
  found = []

  def add(node, name, in_function):
    imp = Import(rel, node.lineno, module, name, in_function)
    if (name == package or name.startswith(package + ".")) and imp not in found:
      found.append(imp)

  def visit(node, in_function):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(node, alias.name, in_function)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      for alias in node.names:
        sub = f"{source}.{alias.name}"
        # `from jaxtune import models` loads the submodule; `from jaxtune.x import f`, module x.
        add(node, sub if sub in known else source, in_function)
    elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
               or (isinstance(node.func, ast.Name)
                   and node.func.id in ("__import__", "import_module")))):
      add(node, node.args[0].value, in_function)
    inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, inner)

  visit(tree, False)
  return found


def check_layers(root: str, package: str = PACKAGE, layers=LAYERS) -> list[Violation]:
  """The upward imports (and imports of or from modules in no layer) under root/package."""
  modules = _modules(root, package)
  known = set(modules)
  violations = []
  for module, path in sorted(modules.items()):
    own = layer_of(module, layers)
    if own is None:
      violations.append(Violation(Import(os.path.relpath(path, root), 1, module, module, False),
                                  TOP, None))
      continue
    for imp in _imports(module, path, root, package, known):
      theirs = layer_of(imp.imported, layers)
      if theirs is None or theirs > own:
        violations.append(Violation(imp, own, theirs))
  return violations


def test_no_module_imports_from_a_layer_above_it():
  violations = check_layers(REPO)
  assert not violations, (
      f"{len(violations)} import(s) reach up a layer (order, low to high: {ORDER}; a module may "
      "import its own layer and those below):\n" + "\n".join(f"  {v}" for v in violations))


def test_every_module_is_in_a_layer_and_the_tree_is_read():
  modules = _modules(REPO, PACKAGE)
  assert len(modules) > 40, sorted(modules)   # the walk found the package
  assert {m for m in modules if layer_of(m) is None} == set()
  assert layer_of("jaxtune") == TOP and layer_of("jaxtune.data.__main__") == TOP
  assert layer_of("jaxtune.launch") == layer_of("jaxtune.train.trainer")
  assert layer_of("jaxtune.hf.load") < layer_of("jaxtune.models.qwen3")
  assert layer_of("jaxtune.configs") is None   # a prefix matches whole names only


# The checker on a synthetic package: it must be able to fail.

def _write(root, files):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def _fake_package(tmp_path, **extra):
  files = {f"jaxtune/{p}/__init__.py": "" for p in ("parallel", "ops", "data", "hf", "models",
                                                     "train", "recipes")}
  files.update({
      "jaxtune/__init__.py": "def __getattr__(name):\n  from jaxtune.train import trainer\n",
      "jaxtune/parallel/mesh.py": "X = 1\n",
      "jaxtune/ops/attention.py": "from jaxtune.parallel import mesh\nfrom . import norms\n",
      "jaxtune/ops/norms.py": "",
      "jaxtune/hf/load.py": "from jaxtune.ops import attention\n",
      "jaxtune/models/qwen3.py": "def load():\n  from jaxtune.hf import load\n",
      "jaxtune/config.py": "import jaxtune.models.qwen3\n",
      "jaxtune/train/trainer.py": "from jaxtune import config, launch\n",
      "jaxtune/launch.py": "from jaxtune.train.trainer import Trainer\n",
      "jaxtune/data/__main__.py": "from jaxtune import config\nfrom ..train import trainer\n",
      "jaxtune/main.py": "from jaxtune import launch\nfrom jaxtune import Trainer\n",
  })
  files.update(extra)
  _write(tmp_path, files)
  return check_layers(str(tmp_path))


def test_checker_passes_a_clean_package(tmp_path):
  # Downward, same-layer (train <-> launch), relative, lazy-__init__ and __main__ imports.
  assert _fake_package(tmp_path) == []


def test_checker_catches_a_function_level_upward_import(tmp_path):
  hidden = """\
      import numpy as np

      def read(path):
        if path:
          from jaxtune.train.trainer import Trainer  # the upward import, out of sight
          return Trainer
      """
  [v] = _fake_package(tmp_path, **{"jaxtune/ops/reader.py": hidden})
  assert v.imp == Import(os.path.join("jaxtune", "ops", "reader.py"), 5, "jaxtune.ops.reader",
                         "jaxtune.train.trainer", True)
  assert (LAYERS[v.importer_layer][0], LAYERS[v.imported_layer][0]) == ("ops", "train")
  message = str(v)
  for words in ("jaxtune/ops/reader.py:5", "jaxtune.train.trainer", "layer 'ops'",
                "layer 'train'", "inside a function", "Fix:"):
    assert words in message, message


@pytest.mark.parametrize("source, imported", [
    ("from .. import models\n", "jaxtune.models"),                       # relative, submodule
    ("from ..models.qwen3 import load\n", "jaxtune.models.qwen3"),       # relative, a name
    ("from jaxtune import models\n", "jaxtune.models"),                  # from-import submodule
    ("import jaxtune.hf.load as hl\n", "jaxtune.hf.load"),               # dotted import
    ("class A:\n  def f(self):\n    import jaxtune.config\n", "jaxtune.config"),   # method
    ("import importlib\nm = importlib.import_module('jaxtune.train')\n", "jaxtune.train"),
    ("from jaxtune import __version__\n", "jaxtune"),                    # the top-layer __init__
    ("from jaxtune.data import __main__\n", "jaxtune.data.__main__"),     # an entry point
])
def test_checker_resolves_every_import_form(tmp_path, source, imported):
  [v] = _fake_package(tmp_path, **{"jaxtune/data/reader.py": source})
  assert v.imp.importer == "jaxtune.data.reader" and v.imp.imported == imported, v


def test_checker_flags_a_module_in_no_layer(tmp_path):
  [v] = _fake_package(tmp_path, **{"jaxtune/builder.py": "X = 1\n"})
  assert v.imported_layer is None and "in no layer" in str(v)
