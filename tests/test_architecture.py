"""The package's shape: imports run one way, and every module imports beside every other."""

import ast
import os
import pkgutil
import subprocess
import sys

import p2p_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(p2p_jax.__file__)


def _modules() -> dict[str, str]:
  """Every module of p2p_jax: dotted name -> file."""
  found = {"p2p_jax": os.path.join(PACKAGE, "__init__.py")}
  for info in pkgutil.walk_packages([PACKAGE], prefix="p2p_jax."):
    path = os.path.join(ROOT, *info.name.split("."))
    found[info.name] = os.path.join(path, "__init__.py") if info.ispkg else path + ".py"
  return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """The p2p_jax modules `name` imports anywhere in its file, inside functions too.

  `import a.b` and `from a import b` count as an edge to a.b when a.b is a module
  (else to a); a package's own __init__ is reached only by importing the package.
  """
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  targets = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      for alias in node.names:
        targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
  return {target for target in targets if target in modules or target.split(".")[0] == "configs"}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imports(name, path, modules) - {name} for name, path in modules.items()}


def test_the_graph_sees_the_known_imports():
  graph = _graph()
  assert {"p2p_jax.step", "p2p_jax.input_pipeline", "p2p_jax.evaluate"} <= graph["p2p_jax.train"]
  assert "p2p_jax.devices" in graph["p2p_jax.datasets.sources"]      # an import inside a method
  assert "p2p_jax.ops.space_to_depth" in graph["p2p_jax.ops.conv_transpose"]   # `from a.b import f`
  assert len(graph) > 30


def test_no_module_of_the_package_is_in_an_import_cycle():
  graph = _graph()
  state, cycles = {}, []

  def visit(name, path):
    state[name] = "open"
    for target in sorted(graph.get(name, ())):
      if state.get(target) == "open":
        cycles.append(path[path.index(target):] + [target] if target in path else [name, target])
      elif target not in state:
        visit(target, path + [target])
    state[name] = "done"

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_package_never_imports_the_configs_folder():
  graph = _graph()
  offenders = {name: sorted(t for t in targets if t.split(".")[0] == "configs")
               for name, targets in graph.items()}
  assert not {name: targets for name, targets in offenders.items() if targets}


def test_the_step_and_evaluation_never_import_the_training_loop():
  graph = _graph()

  def reaches(start):
    seen, todo = set(), [start]
    while todo:
      for target in graph[todo.pop()] - seen:
        seen.add(target)
        todo.append(target)
    return seen

  for module in ("p2p_jax.step", "p2p_jax.evaluate", "p2p_jax.input_pipeline",
                 "p2p_jax.models", "p2p_jax.predict", "p2p_jax.bench"):
    assert "p2p_jax.train" not in reaches(module), module


def test_every_module_imports_in_one_process_without_defining_flags_twice():
  names = sorted(_modules())
  code = ("import importlib, sys\n"
          f"for name in {names!r}:\n"
          "  importlib.import_module(name)\n"
          "from absl import flags\n"
          "print(sorted(flags.FLAGS))\n")
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  defined = result.stdout.strip().splitlines()[-1]
  # Only p2p_jax.main, the one entry point with module-level flags, defines any.
  for flag in ("workdir", "config", "mode", "distributed"):
    assert f"'{flag}'" in defined
  for flag in ("input", "output", "fit", "table", "warmup", "steps"):
    assert f"'{flag}'" not in defined


# README's Layout drawing, bottom up: a module imports only from lower layers, or from
# its siblings inside one subpackage (ops/, datasets/).
LAYERS = (
    ("p2p_jax", "p2p_jax.validation", "p2p_jax.datasets.errors", "p2p_jax.hardware"),
    ("p2p_jax.ops", "p2p_jax.ops.*", "p2p_jax.devices", "p2p_jax.losses", "p2p_jax.metrics",
     "p2p_jax.images", "p2p_jax.monitoring", "p2p_jax.color_stats", "p2p_jax.variants",
     "p2p_jax.workdir", "p2p_jax.perceptual"),
    ("p2p_jax.models", "p2p_jax.datasets", "p2p_jax.datasets.*", "p2p_jax.checkpoints"),
    ("p2p_jax.step", "p2p_jax.input_pipeline", "p2p_jax.config_checks"),
    ("p2p_jax.segmentation",),
    ("p2p_jax.evaluate",),
    ("p2p_jax.train",),
    ("p2p_jax.cli",),
    ("p2p_jax.main", "p2p_jax.predict", "p2p_jax.bench", "p2p_jax.convert_torch",
     "p2p_jax.ablate", "p2p_jax.data_service", "p2p_jax.export"),
)


def _layer(name):
  for index, members in enumerate(LAYERS):
    if name in members or (name.rpartition(".")[0] + ".*") in members:
      return index
  raise AssertionError(f"{name} is in no layer of README's Layout drawing")


def test_imports_follow_the_layers_of_the_layout_drawing():
  upward = []
  for name, targets in _graph().items():
    for target in targets:
      sibling = name.rpartition(".")[0] == target.rpartition(".")[0] != "p2p_jax"
      package_init = target == name.rpartition(".")[0] or name == target.rpartition(".")[0]
      if _layer(target) > _layer(name) or (_layer(target) == _layer(name)
                                           and not (sibling or package_init)):
        upward.append(f"{name} -> {target}")
  assert not upward, upward
