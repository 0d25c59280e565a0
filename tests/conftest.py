"""Hypothesis profiles, picked by HYPOTHESIS_PROFILE: ci (1,000 examples), dev (100, default)."""

import os

from hypothesis import settings

# deadline=None under ci: the 2-core CI runners stall now and then, and a
# stalled example is not a slow converter.
settings.register_profile("ci", max_examples=1000, deadline=None)
settings.register_profile("dev", max_examples=100)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
