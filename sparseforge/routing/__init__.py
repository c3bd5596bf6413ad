"""Run-time routing for the dynamic patterns (``sparseforge.ir.routing``): the torch
reference of every rule (the oracle of the indices), the index layouts it emits, and the
pre-kernel DAG a plan records."""
