"""Routing semantics for the dynamic patterns (``sparseforge.ir.routing``), with torch ops:
bucket geometry and candidates (``geometry``), the rules themselves (``rules``) and the
selections they produce with their index layouts (``selection``). Low in the layers: the
planner's routing steps, the pre-kernels' sources (codegen) and their launches (runtime)
sit above it."""
