"""The rope x mask x seed ablation study: each job trains, then scores its export in the same process.

``python -m tc_llava.ablation`` (configs/ablation.yaml: ``train.yaml`` with ``experiment=ablation``)
runs the Hydra multirun; :mod:`tc_llava.ablation.job` is one job's evaluation half and
:mod:`tc_llava.ablation.collect` turns a sweep into one table. The study sits above the
training and evaluation stages, which never import each other.
"""
