"""What the benchmarks (and the tests that check the engine against them) need beside the
package: the engine as it was before continuous batching and the model cards' naive loop
(`static_engine`), and forced output lengths on random models (`forcing`). Never used by runs.

The benchmarks run as scripts (`python bench/inference.py`) with the repository root on
`sys.path`; the tests import these modules the same way (pytest's `pythonpath = ["."]`).
"""
