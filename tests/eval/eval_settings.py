"""Shared settings of the eval command tests (a module of its own: with several test folders, only the first
``conftest`` imported is reachable by that name)."""

# Small frames (56 x 56 -> 4 x 4 patches) keep prompts short: these are plumbing tests, not benchmarks.
SMALL_PIXELS = ["--set", "video_min_pixels=3136", "--set", "video_max_pixels=3136"]
