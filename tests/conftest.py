import os
import sys

# Tests import their helpers as a plain module and the package from the checkout.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

# CI must not fail on an example that a random search happens to find one day and not the next: there the
# property tests run a fixed (derandomized) set of examples; locally they keep exploring.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
