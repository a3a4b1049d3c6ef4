"""Forgetting measured: task and general-ability scores, drift from the base, the report."""
