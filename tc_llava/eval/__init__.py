"""Benchmarks: one module each, all of the same shape, run by the eval app (``python -m tc_llava.eval``).

Every benchmark module exposes two functions (:class:`tc_llava.eval.__main__.Benchmark`):

- ``check_inputs(cfg, run_dir, state) -> None`` raises on everything that can fail without
  the model (paths, records, generation settings, saved predictions, the judge);
- ``evaluate(model, cfg, run_dir, state) -> results | None`` generates through
  :mod:`~tc_llava.eval.runner` and scores; the main process returns the results.

Adding a benchmark:

1. ``tc_llava/eval/<name>.py``: its loader (records -> :class:`~tc_llava.eval.runner.Item` s;
   :class:`~tc_llava.eval.mcq.Question` s for a multiple-choice benchmark, which then delegates
   to :func:`~tc_llava.eval.mcq.evaluate`; :class:`~tc_llava.eval.judged.Entry` s for a
   generate-then-judge benchmark, which delegates to :func:`~tc_llava.eval.judged.check_inputs` /
   :func:`~tc_llava.eval.judged.evaluate`), its table, ``check_inputs`` and ``evaluate``. A set
   in MVBench's layout (a task table of question files) needs no module: its config names
   ``protocol: mvbench`` and its table;
2. ``tc_llava/configs/benchmark/<name>.yaml``, starting with
   ``defaults: [/base/benchmark@_here_, _self_]`` and setting ``name`` and ``protocol: <name>``;
3. one line in :data:`tc_llava.eval.__main__.BENCHMARKS`: ``"<name>": <name>``.
"""
