"""The expert hit-rate profiler: routing traces (recorded, imported, synthesized), policy replay, reports."""
