"""``python -m emoqwen_jax.eval.demo_general``: the README's command for the synthetic general set; the code
lives in ``emoqwen_jax.eval.general.demo``."""

from emoqwen_jax.eval.general.demo import build_demo_general, main  # noqa: F401 (the documented names)

if __name__ == "__main__":
    raise SystemExit(main())
