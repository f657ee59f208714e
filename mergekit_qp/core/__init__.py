"""Pure maths, torch only: solvers, the objective and ρ, per-tensor problems, statistics, SVC, spectrum."""
