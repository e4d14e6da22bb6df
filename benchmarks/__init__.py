"""Benchmarks and paper tables; run as modules: ``python -m benchmarks.table1_mnist``."""
