"""General vision-language benchmarks (MMBench, MME, POPE, ScienceQA-IMG, SEED-Bench, TextVQA, VQAv2): the
benchmark table (``benchmarks``), readers of the published layouts (``data``), their scores (``scores``,
``vqa_accuracy``) and a synthetic set in those layouts (``demo``). Imports emotion's answering loop, never
the suites."""
