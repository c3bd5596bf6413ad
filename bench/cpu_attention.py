"""The CPU comparison (issue 20): sliding window, causal, 2-D neighbourhood and documents at
B=1, H=4, L=4096, D=64, fp32 — sparseforge vs dense SDPA vs compiled FlexAttention,
forward and forward+backward, and sparseforge again with every core kept busy. Writes
bench/results/cpu_attention.json. Same as ``sparseforge bench --no-build``. Run from the
repository root:

    python bench/cpu_attention.py
"""

from sparseforge import cpu_bench

if __name__ == "__main__":
    print(cpu_bench.table(cpu_bench.run()))
