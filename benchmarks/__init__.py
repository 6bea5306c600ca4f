"""worldvla benchmarks (shipped as `worldvla.benchmarks`; run with `worldvla bench`)."""
