"""CPU benchmark of issue 2 (sliding window 256, B=1, H=4, L=4096, D=64): sparseforge's CPU
path vs dense SDPA with the bool mask vs compiled FlexAttention, plus warm dispatch
overhead. Writes bench/results/cpu_sliding_window.json. Run from the repository root:

    python bench/cpu_sliding_window.py
"""

from sparseforge.benchmarks import main

if __name__ == "__main__":
    main()
