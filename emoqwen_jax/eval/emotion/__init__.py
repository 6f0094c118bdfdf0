"""Emotion benchmarks: label sets, prompts and folds (``benchmarks``), honest UAR/WAR/weighted-F1 scores with
an invalid bucket (``scores``), scoring prediction files (``report``), the judge-free EMER metric (``emer``) and
the answering loop over clips and requests (``runner``, also used by the general benchmarks)."""
