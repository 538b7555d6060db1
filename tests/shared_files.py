"""Where the project's shared reference files are: the fidelity vectors and the PyTorch step.

They lie in a `shared/` folder beside the checkout (or inside it); P2P_JAX_SHARED names another
place. A test that needs them and finds none fails, naming where it looked.
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = [path for path in (os.environ.get("P2P_JAX_SHARED"),
                                os.path.join(ROOT, "..", "shared"),
                                os.path.join(ROOT, "shared")) if path]


def shared_path(*parts: str) -> str:
  """The first existing CANDIDATES/parts; raises FileNotFoundError listing where it looked."""
  for base in CANDIDATES:
    path = os.path.join(base, *parts)
    if os.path.exists(path):
      return os.path.abspath(path)
  raise FileNotFoundError(
      f"{os.path.join(*parts)} is in none of {CANDIDATES}: put the project's shared/ folder "
      "beside the checkout or set P2P_JAX_SHARED to it.")
